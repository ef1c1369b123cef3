"""The classifier: pooling consistency, head, LoRA targets, save/load and merge round trips."""

from __future__ import annotations

import pytest
import torch

from textclf.components.encoding import PromptEncoder, format_prompt
from textclf.components.model import MLPHead, base_of, build_classifier, load_classifier, save_classifier
from textclf.config import ModelConfig
from textclf.errors import TextclfError
from textclf.serving.inference import Predictor

TEXTS = ["a gem", "a dull , boring mess that goes on and on and never ends", "fine", "great acting and a moving story"]
NAMES = ["Negative", "Positive"]


def make(base, mode="lora", **overrides):
    from textclf.config import DEFAULT_PROMPT_TEMPLATE

    torch.manual_seed(0)
    model, tokenizer = build_classifier(ModelConfig(base_model=base, **overrides), mode, NAMES, DEFAULT_PROMPT_TEMPLATE, 128)
    return model.eval(), tokenizer


@pytest.mark.parametrize("base", ["tiny_llama", "minilm", "tiny_llama_no_pad"])
def test_batch_gives_same_logits_as_one_text_at_a_time(base, request):
    model, tokenizer = make(request.getfixturevalue(base))
    predictor = Predictor(model, tokenizer, batch_size=4)
    batched = predictor.logits(TEXTS)
    predictor.batch_size = 1
    single = predictor.logits(TEXTS)
    assert torch.allclose(torch.from_numpy(batched), torch.from_numpy(single), atol=1e-5)
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"


def test_pooling_defaults_follow_the_architecture(tiny_llama, minilm):
    assert make(tiny_llama)[0].spec.pooling == "last"
    assert make(minilm)[0].spec.pooling == "mean"


def test_mlp_head_shape_and_init():
    head = MLPHead(64, 8, 0.1)
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(64, 512), (512, 256), (256, 8)]
    assert all(float(l.bias.detach().abs().sum()) == 0 for l in linears)
    bound = (6 / (64 + 512)) ** 0.5  # Xavier uniform
    assert float(linears[0].weight.abs().max()) <= bound


def test_lora_targets_llama_names_and_encoder_equivalents(tiny_llama, minilm):
    llama, _ = make(tiny_llama)
    assert sorted(llama.spec.lora["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert llama.spec.lora["r"] == 64 and llama.spec.lora["lora_alpha"] == 16
    trainable = {n.split(".")[0] for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable == {"backbone", "head"}
    assert all("lora_" in n for n, p in llama.backbone.named_parameters() if p.requires_grad)
    bert, _ = make(minilm)
    assert set(bert.spec.lora["target_modules"]) == {"query", "key", "value", "dense"}


def test_absent_lora_targets_are_refused(tiny_llama):
    with pytest.raises(TextclfError, match="LoRA targets absent from the model: nope"):
        make(tiny_llama, lora_targets="q_proj,nope")


def test_missing_or_invalid_base_model(tmp_path):
    with pytest.raises(TextclfError, match="base model folder does not exist"):
        make(str(tmp_path / "missing"))
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(TextclfError, match="not a Hugging Face model folder"):
        make(str(tmp_path / "notamodel"))


def test_a_saved_model_is_no_base_model_and_a_newer_folder_format_is_refused(tmp_path, tiny_llama):
    import json

    from textclf.components.model import FORMAT_VERSION, SPEC_FILE

    model, tokenizer = make(tiny_llama)
    save_classifier(model, tokenizer, tmp_path / "model", {"seed": 0})
    # Its config.json is the run's configuration: the folder is still no Hugging Face base model.
    with pytest.raises(TextclfError, match="not a Hugging Face model folder but a trained textclf model"):
        make(str(tmp_path / "model"))
    spec = json.loads((tmp_path / "model" / SPEC_FILE).read_text())
    (tmp_path / "model" / SPEC_FILE).write_text(json.dumps({**spec, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(TextclfError, match="by a newer textclf"):
        load_classifier(tmp_path / "model")


@pytest.mark.parametrize("mode, overrides", [("lora", {}), ("lora", {"lora_layers": 1}), ("full", {})],
                         ids=["lora", "lora-top-layer", "full"])
def test_save_load_round_trip_and_merged_equals_adapter(tmp_path, tiny_llama, mode, overrides):
    model, tokenizer = make(tiny_llama, mode=mode, **overrides)
    if mode == "lora":  # make the adapter matter: LoRA's B starts at zero
        with torch.no_grad():
            for name, param in model.backbone.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
    before = Predictor(model, tokenizer).logits(TEXTS)
    save_classifier(model, tokenizer, tmp_path / "model")  # merges LoRA in place
    after_merge = Predictor(model, tokenizer).logits(TEXTS)
    loaded, loaded_tokenizer = load_classifier(tmp_path / "model")
    reloaded = Predictor(loaded, loaded_tokenizer).logits(TEXTS)
    assert abs(before - after_merge).max() < 1e-4
    assert abs(before - reloaded).max() < 1e-4
    assert loaded.config.id2label == {0: "Negative", 1: "Positive"}
    if mode == "lora":
        assert (tmp_path / "model" / "adapter" / "adapter_config.json").exists()
    if overrides.get("lora_layers"):  # the adapters of the top layer only, recorded with the model
        assert loaded.spec.lora["layers_to_transform"] == [1]


def test_base_layers_keeps_the_pretrained_lowest_layers_through_save_load_and_resume(tmp_path, tiny_llama):
    from safetensors.torch import save_file
    from transformers import AutoModel

    from textclf.components.model import rebuild_from_state, trained_state

    model, tokenizer = make(tiny_llama, base_layers=1)
    assert model.config.num_hidden_layers == 1 and model.spec.base_layers == 1
    # Its features are the whole model's after layer 0 (with the final norm): the pretrained weights, not fresh ones.
    whole = AutoModel.from_pretrained(tiny_llama).eval()
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = whole.norm(whole(**batch, output_hidden_states=True).hidden_states[1])
        torch.testing.assert_close(model.backbone(**batch).last_hidden_state, expected)
    with torch.no_grad():  # as if trained: the adapters matter
        for name, param in model.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    before = Predictor(model, tokenizer).logits(TEXTS)
    # A checkpoint (adapters and head only) rebuilds onto the same lowest layer, as a resumed run does.
    model.spec.save(tmp_path / "checkpoint")
    save_file({k: v.contiguous() for k, v in trained_state(model).items()}, str(tmp_path / "checkpoint" / "w.safetensors"))
    rebuilt, _ = rebuild_from_state(tmp_path / "checkpoint", tmp_path / "checkpoint" / "w.safetensors")
    assert abs(Predictor(rebuilt, tokenizer).logits(TEXTS) - before).max() < 1e-4
    # The saved model holds that one layer and predicts alike, with nothing but its folder.
    save_classifier(model, tokenizer, tmp_path / "model")
    loaded, loaded_tokenizer = load_classifier(tmp_path / "model")
    assert loaded.config.num_hidden_layers == 1
    assert abs(Predictor(loaded, loaded_tokenizer).logits(TEXTS) - before).max() < 1e-4


def test_base_layers_on_an_encoder_and_on_a_model_with_per_layer_attention_kinds(tmp_path, tiny_llama, minilm):
    import shutil

    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    # Qwen2 declares each layer's attention kind (layer_types), which must follow the depth into the saved model.
    qwen = tmp_path / "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=16,
                         max_window_layers=1)
    assert len(config.layer_types) == 3
    torch.manual_seed(0)
    Qwen2Model(config).save_pretrained(qwen)
    tokenizer.save_pretrained(qwen)
    for base, layers in ((str(qwen), 2), (minilm, 4)):
        model, tokenizer = make(base, mode="full", base_layers=layers)
        assert model.config.num_hidden_layers == layers
        before = Predictor(model, tokenizer).logits(TEXTS)
        save_classifier(model, tokenizer, tmp_path / f"model-{layers}")
        loaded, loaded_tokenizer = load_classifier(tmp_path / f"model-{layers}")
        assert loaded.config.num_hidden_layers == layers
        assert abs(Predictor(loaded, loaded_tokenizer).logits(TEXTS) - before).max() < 1e-4
    shutil.rmtree(qwen)


def test_base_layers_beyond_the_models_depth_are_refused(tiny_llama):
    with pytest.raises(TextclfError, match="base_layers=3: .* has 2 transformer layers"):
        make(tiny_llama, base_layers=3)
    from textclf.config import build_config

    with pytest.raises(TextclfError, match="lora_layers=2: base_layers=1 keeps only 1 transformer layers"):
        build_config("lora", base_model=tiny_llama, base_layers=1, lora_layers=2)
    with pytest.raises(TextclfError, match="frozen_layers=3: base_layers=2 keeps only 2 transformer layers"):
        build_config("full", base_model=tiny_llama, base_layers=2, frozen_layers=3)


def test_truncation_cuts_the_text_not_the_template(tiny_llama):
    from textclf.components.model import load_tokenizer
    from textclf.config import DEFAULT_PROMPT_TEMPLATE

    tokenizer = load_tokenizer(tiny_llama)
    encoder = PromptEncoder(tokenizer, DEFAULT_PROMPT_TEMPLATE, NAMES, max_length=120)
    encoded = encoder.encode(["word " * 500, "short"])
    assert encoded.truncated == 1
    assert max(encoded.lengths) <= 120
    tail = tokenizer.decode(encoded.input_ids[0][-6:])
    assert tail.endswith("answer:")
    assert format_prompt(DEFAULT_PROMPT_TEMPLATE, "x {y}", NAMES).endswith('["Negative", "Positive"],answer:')


def test_fast_cpu_dropout_drops_at_the_rate_and_scales_like_torch():
    import torch

    from textclf.components.dropout import FastCPUDropout

    dropout = FastCPUDropout(0.1).train()
    x = torch.ones(1000, 1001, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002  # 1M draws: the std of the rate is 0.0003
    for offset in range(4):  # each 16-bit slice of the 64-bit draws is uniform, the sign bit included
        assert abs(kept.flatten()[offset::4].float().mean().item() - 0.9) < 0.003
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.9)
    assert not torch.equal(dropout(x), y)  # a fresh mask each call
    assert dropout.eval()(x) is x


def test_fast_cpu_dropout_replaces_every_lora_and_head_dropout(tiny_llama):
    from torch import nn

    from textclf.components.dropout import FastCPUDropout, use_fast_cpu_dropout
    from textclf.components.model import build_classifier
    from textclf.config import ModelConfig

    model, _ = build_classifier(ModelConfig(base_model=tiny_llama), "lora", ["a", "b"], "{text}", 64)
    assert use_fast_cpu_dropout(model) == 2 * 7 + 2  # 7 LoRA projections in each of 2 layers, 2 in the head
    assert not any(type(m) is nn.Dropout and m.p > 0 for m in model.modules())
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, FastCPUDropout))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("mask", [None, "boolean", "additive", "position bias"])
def test_attention_with_fast_dropout_computes_what_sdpa_computes(causal, groups, mask):
    """A drop probability that drops nothing (below 1/65536) takes the hand-written path and must give SDPA's
    result and gradients for every mask transformers hands SDPA, causal or not, with grouped key/value heads or
    not, at the model's scaling; a relative position bias, which only SDPA's path applies, goes to SDPA."""
    import torch
    from torch import nn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from textclf.components.attention_dropout import sdpa_with_fast_dropout

    module = nn.Module()
    module.is_causal, module.num_key_value_groups = causal, groups
    torch.manual_seed(0)
    shapes = ((2, 6, 10, 8), (2, 6 // groups, 10, 8), (2, 6 // groups, 10, 8))
    attends = torch.rand(2, 1, 10, 10) > 0.3
    attends[..., 0] = True  # every query attends somewhere
    masks = {None: None, "boolean": attends, "additive": torch.where(attends, 0.0, torch.finfo(torch.float32).min),
             "position bias": attends}
    extra = {"position_bias": torch.randn(1, 6, 10, 10)} if mask == "position bias" else {}
    results = []
    for attention, dropout in ((sdpa_attention_forward, 0.0), (sdpa_with_fast_dropout, 1e-9)):
        torch.manual_seed(1)
        query, key, value = (torch.randn(*shape, requires_grad=True) for shape in shapes)
        output, _ = attention(module, query, key, value, masks[mask], dropout=dropout, scaling=0.3, **extra)
        output.pow(2).sum().backward()
        results.append((output, query.grad, key.grad, value.grad))
    for expected, computed in zip(*results):
        assert torch.allclose(computed, expected, atol=1e-5)


def test_attention_with_fast_dropout_drops_probabilities_at_the_rate():
    import torch
    from torch import nn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from textclf.components.attention_dropout import sdpa_with_fast_dropout

    module = nn.Module()
    module.is_causal = False
    query, key = torch.zeros(1, 1, 400, 4), torch.zeros(1, 1, 400, 4)  # uniform attention: each weight 1/400
    value = torch.eye(400)[None, None]  # the output's rows are the (dropped) attention weights themselves
    weights, _ = sdpa_with_fast_dropout(module, query, key, value, None, dropout=0.25)
    kept = weights[0, :, 0] != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 160,000 draws
    assert torch.allclose(weights[0, :, 0][kept], torch.full((int(kept.sum()),), 1 / 400 / 0.75))
    # Evaluating, models pass no dropout: then it is SDPA itself.
    evaluated, _ = sdpa_with_fast_dropout(module, query, key, value, None, dropout=0.0)
    assert torch.equal(evaluated, sdpa_attention_forward(module, query, key, value, None, dropout=0.0)[0])


def test_encoders_train_with_the_fast_attention_dropout_and_save_their_usual_attention(minilm, tmp_path, monkeypatch):
    """MiniLM drops attention probabilities: CPU training switches its attention, the training forward and
    backward run, and a saved copy names no attention function that another process would lack."""
    import json

    from textclf.components import attention_dropout
    from textclf.components.attention_dropout import FAST_DROPOUT_ATTENTION
    from textclf.components.dropout import fast_dropout
    from textclf.components.trainer import adapt_to_device

    model, _ = build_classifier(ModelConfig(base_model=minilm), "full", ["a", "b"], "{text}", 64)
    encoder = base_of(model.backbone)
    assert encoder.config._attn_implementation == "sdpa"
    adapt_to_device(model)
    assert encoder.config._attn_implementation == FAST_DROPOUT_ATTENTION
    dropped = []  # the attention probabilities that went through the fast mask: batch x heads x length x length

    def counting(x, p):
        dropped.append(tuple(x.shape))
        return fast_dropout(x, p)

    monkeypatch.setattr(attention_dropout, "fast_dropout", counting)
    model.train()
    ids = torch.randint(1000, 2000, (2, 12))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1])).loss.backward()
    assert dropped == [(2, encoder.config.num_attention_heads, 12, 12)] * encoder.config.num_hidden_layers
    assert encoder.embeddings.word_embeddings.weight.grad is not None
    encoder.save_pretrained(tmp_path / "saved")
    saved = (tmp_path / "saved" / "config.json").read_text()
    assert FAST_DROPOUT_ATTENTION not in saved and json.loads(saved)["attention_probs_dropout_prob"] == 0.1


def test_models_without_attention_dropout_keep_their_attention(tiny_llama):
    from transformers import AutoModel

    from textclf.components.attention_dropout import use_fast_cpu_attention_dropout

    decoder = AutoModel.from_pretrained(tiny_llama)
    implementation = decoder.config._attn_implementation
    assert not use_fast_cpu_attention_dropout(decoder)
    assert decoder.config._attn_implementation == implementation


@pytest.mark.parametrize("base", ["tiny_llama", "minilm"])
def test_frozen_layers_train_only_the_layers_above_them(base, request):
    """Backward stops above the frozen layers: the embeddings and the lowest layer keep their weights, the
    layers above and the head learn, and the optimizer is given only what trains."""
    model, tokenizer = make(request.getfixturevalue(base), "full", frozen_layers=1)
    names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert names and not any("embed" in name for name in names)
    assert not any(".layers.0." in name or ".layer.0." in name for name in names)
    assert any(".layers.1." in name or ".layer.1." in name for name in names) and any(n.startswith("head.") for n in names)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    batch = tokenizer(["a fine film", "a dull film"], return_tensors="pt", padding=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**batch, labels=torch.tensor([1, 0])).loss.backward()
    optimizer.step()
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert changed and changed <= names and any(name.startswith("head.") for name in changed)
    assert any(".layers.1." in name or ".layer.1." in name for name in changed)
    assert all(parameter.grad is None for parameter in model.parameters() if not parameter.requires_grad)


def test_frozen_layers_must_leave_a_layer_to_train_and_need_full_mode(tiny_llama):
    with pytest.raises(TextclfError, match="frozen_layers=2: the model has 2 layers"):
        make(tiny_llama, "full", frozen_layers=2)
    from textclf.config import build_config

    with pytest.raises(TextclfError, match="frozen_layers applies to mode=full"):
        build_config("lora", frozen_layers=1)


@pytest.mark.parametrize("mode, overrides", [("full", {"frozen_layers": 1}), ("lora", {"lora_layers": 1})],
                         ids=["frozen_layers", "lora_layers"])
def test_lower_layers_are_not_backpropagated_through_with_gradient_checkpointing(tiny_llama, mode, overrides):
    """Checkpointing must not make the untrained lower layer's output require grad (backward would run through it)."""
    model, tokenizer = make(tiny_llama, mode, **overrides)
    model.gradient_checkpointing_enable()
    model.train()
    seen = {}
    layers = base_of(model.backbone).layers
    layers[0].register_forward_hook(lambda module, args, output: seen.update(frozen=output[0] if isinstance(output, tuple) else output))
    layers[1].register_forward_hook(lambda module, args, output: seen.update(trained=output[0] if isinstance(output, tuple) else output))
    batch = tokenizer(["a fine film"], return_tensors="pt")
    model(**batch, labels=torch.tensor([1])).loss.backward()
    assert not seen["frozen"].requires_grad and seen["trained"].requires_grad
    trained = [p for n, p in layers[1].named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    assert all(p.grad is None for p in layers[0].parameters())