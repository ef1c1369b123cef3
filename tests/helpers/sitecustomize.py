"""Loaded by every Python process of a test that puts this folder on PYTHONPATH, to act inside DeepSpeed ranks:

- TEXTCLF_TEST_FAIL_RANK=<rank>: that rank raises when training starts (how a multi-process run fails);
- TEXTCLF_TEST_SCRIPTED_F1=0.5,0.6,...: the ranks' validation scores, per evaluation (scripted_metrics.py);
- TEXTCLF_TEST_RANK0_FINISH_DELAY=<seconds>: rank 0 waits that long before its finishing work (test, logging);
- TEXTCLF_TEST_EXIT_LOG=<folder>: each rank writes the time it exits to <folder>/rank-<rank>.
"""

import os

RANK = os.environ.get("RANK")

if os.environ.get("TEXTCLF_TEST_FAIL_RANK") is not None and RANK == os.environ["TEXTCLF_TEST_FAIL_RANK"]:
    import transformers

    def _fail(self, *args, **kwargs):
        raise RuntimeError(f"rank {RANK} failed on purpose")

    transformers.Trainer.train = _fail

if os.environ.get("TEXTCLF_TEST_SCRIPTED_F1") and RANK is not None:
    from scripted_metrics import install_from_environment

    install_from_environment()

if os.environ.get("TEXTCLF_TEST_RANK0_FINISH_DELAY") and RANK == "0":
    import time

    import textclf.recipes.training as training

    _finish = training.finish_run

    def _slow_finish(*args, **kwargs):
        time.sleep(float(os.environ["TEXTCLF_TEST_RANK0_FINISH_DELAY"]))
        return _finish(*args, **kwargs)

    training.finish_run = _slow_finish

if os.environ.get("TEXTCLF_TEST_EXIT_LOG") and RANK is not None:
    import atexit
    import time
    from pathlib import Path

    atexit.register(lambda: (Path(os.environ["TEXTCLF_TEST_EXIT_LOG"]) / f"rank-{RANK}").write_text(str(time.time())))
