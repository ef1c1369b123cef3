"""Loaded by every Python process of a test that puts this folder on PYTHONPATH: makes the rank named
by TEXTCLF_TEST_FAIL_RANK raise when training starts, to test how a multi-process run fails."""

import os

if os.environ.get("TEXTCLF_TEST_FAIL_RANK") is not None and os.environ.get("RANK") == os.environ["TEXTCLF_TEST_FAIL_RANK"]:
    import transformers

    def _fail(self, *args, **kwargs):
        raise RuntimeError(f"rank {os.environ['RANK']} failed on purpose")

    transformers.Trainer.train = _fail
