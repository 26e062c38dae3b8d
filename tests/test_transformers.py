"""flash_ext as a transformers attention implementation: small randomly initialised Llama-style
(GQA) and GPT-2-style models against transformers' own sdpa implementation, Mistral-style
(sliding window) and Gemma-2-style (sliding window on every other layer, soft-capping) models
against its eager one (its sdpa path has no soft-capping), on the CPU (float64, through the
reference) and on the GPU (bf16, through the kernels, with the 2x rule against a float64
model). Skipped where transformers is not installed."""

import copy
import warnings

import pytest
import torch

import flash_ext

transformers = pytest.importorskip("transformers")
from flash_ext.integrations import transformers as fx_transformers  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB = 101


def configs():
    return {
        "llama-gqa": transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256),
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                        bos_token_id=0, eos_token_id=0),
        "mistral-window": transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                     head_dim=16, max_position_embeddings=256, sliding_window=7),
        "gemma2-window-softcap": transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2, head_dim=16,
                                                           max_position_embeddings=256, sliding_window=7,
                                                           attn_logit_softcapping=2.0, final_logit_softcapping=None),
    }


# The implementation each model is compared with: transformers' sdpa where it computes the same
# thing, eager for soft-capping; and how close float64 gets to it (eager takes its softmax in float32).
BASELINE = {"llama-gqa": "sdpa", "gpt2": "sdpa", "mistral-window": "sdpa", "gemma2-window-softcap": "eager"}
CPU_TOLERANCE = {"sdpa": 1e-10, "eager": 1e-6}
ARCHS = list(BASELINE)


def model_pair(arch, dtype, device, seed=0):
    """The same weights twice: on flash_ext and on transformers' own implementation, in eval mode (no dropout)."""
    torch.manual_seed(seed)
    cfg = configs()[arch]
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=fx_transformers.register(),
                                                         dtype=dtype).to(device).eval()
    theirs = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=BASELINE[arch],
                                                           dtype=dtype).to(device).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def count_flash_ext_calls(monkeypatch):
    calls = []
    real = fx_transformers.attention
    monkeypatch.setattr(fx_transformers, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


def logits_and_grads(model, ids, mask=None):
    model.zero_grad()
    logits = model(ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_name_is_one_transformers_accepts():
    name = fx_transformers.register()
    assert name == "fa_ext" and "flash" not in name and "sdpa" not in name
    model, _ = model_pair("llama-gqa", torch.float64, "cpu")
    assert model.config._attn_implementation == name


# What each layer of the models passes flash_ext.attention: (window, softcap) per layer.
LAYER_BANDS = {"llama-gqa": [(None, None)] * 2, "gpt2": [(None, None)] * 2,
               "mistral-window": [((6, 0), None)] * 2,
               "gemma2-window-softcap": [((6, 0), 2.0), (None, 2.0)]}


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_logits_and_gradients_match_transformers(arch, monkeypatch):
    ours, theirs = model_pair(arch, torch.float64, "cpu")
    calls = count_flash_ext_calls(monkeypatch)
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    got, got_grads = logits_and_grads(ours, ids)
    want, want_grads = logits_and_grads(theirs, ids)
    assert len(calls) == 2 and all(kw["causal"] for kw in calls), calls  # each layer through flash_ext
    assert [(kw["window"], kw["softcap"]) for kw in calls] == LAYER_BANDS[arch]
    tol = CPU_TOLERANCE[BASELINE[arch]]
    assert (got - want).abs().max().item() < tol
    assert got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        assert (g - want_grads[name]).abs().max().item() < tol * max(1.0, want_grads[name].abs().max().item()), name


def test_padding_mask_runs_on_torch_sdpa_with_a_warning():
    ours, theirs = model_pair("llama-gqa", torch.float64, "cpu")
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    flash_ext.sdpa._warned.clear()
    with pytest.warns(UserWarning, match="an attn_mask tensor runs on torch's SDPA"):
        got = ours(ids, attention_mask=mask).logits
    want = theirs(ids, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max().item() < 1e-10


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_a_kv_cache_matches_transformers(arch):
    """Prefill, then one query at a time against the cache (longer than the windows): causal and
    the window aligned to the bottom-right."""
    ours, theirs = model_pair(arch, torch.float64, "cpu")
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = ours.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        want = theirs.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs,what", [(dict(position_bias=torch.zeros(1, 2, 4, 4)), "position bias"),
                                         (dict(s_aux=torch.zeros(2)), "sinks")])
def test_what_flash_ext_cannot_do_is_refused_not_ignored(kwargs, what):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match=what):
        fx_transformers.attention_forward(torch.nn.Module(), q, q, q, None, **kwargs)


def test_softcap_with_a_padding_mask_is_refused():
    """torch's SDPA, the fallback for padding masks, has no soft-capping: an error, not a silent drop."""
    ours, _ = model_pair("gemma2-window-softcap", torch.float64, "cpu")
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :5] = 0
    with pytest.raises(NotImplementedError, match="soft-capping"):
        ours(ids, attention_mask=mask)


@CUDA
@pytest.mark.parametrize("arch", ["llama-gqa", "gemma2-window-softcap"])
def test_cuda_model_compiles_fullgraph(arch):
    """The kernels (Gemma-2: the band kernel with a window and a cap) under torch.compile(fullgraph=True),
    forward and backward: the same logits and gradients as the model run eagerly."""
    ours, _ = model_pair(arch, torch.bfloat16, "cuda")
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(7)).cuda()
    want, want_grads = logits_and_grads(ours, ids)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to torch's SDPA
        got, got_grads = logits_and_grads(compiled, ids)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name.removeprefix("_orig_mod.")], atol=2e-2, rtol=2e-2)


@CUDA
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_logits_and_gradients_within_twice_torchs_error(arch, monkeypatch):
    """bf16 on the GPU: flash_ext's error against the float64 model at most twice sdpa's, plus slack."""
    ours, theirs = model_pair(arch, torch.bfloat16, "cuda")
    exact, _ = model_pair(arch, torch.float64, "cpu")  # float64 through the reference (CUDA: no float64 kernels)
    exact.load_state_dict({k: v.double().cpu() for k, v in ours.state_dict().items()})
    calls = count_flash_ext_calls(monkeypatch)
    ids = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(5)).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        got, got_grads = logits_and_grads(ours, ids)
    assert len(calls) == 2
    want, want_grads = logits_and_grads(theirs, ids)
    ref, ref_grads = logits_and_grads(exact, ids.cpu())
    err = lambda x, r: (x.double().cpu() - r).abs().max().item()
    assert err(got, ref) <= 2 * err(want, ref) + 1e-3
    for name, r in ref_grads.items():
        assert err(got_grads[name], r) <= 2 * err(want_grads[name], r) + 1e-3 * max(1.0, r.abs().max().item()), name
