"""LoRA with PEFT on the transformers wrapper: adapters on the projections (Conba, attention, MLPs) and on the
stacked experts (`target_parameters`) change the model, decode through the cache as the full forward does,
save and load, merge into a plain model that this library loads, and train while the base stays frozen; and
PEFT's prompt tuning (virtual tokens through inputs_embeds)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", minversion="5", reason="needs transformers >= 5")
pytest.importorskip("peft", minversion="0.17", reason="needs peft >= 0.17 (target_parameters)")

from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model

from mixcon import MixConForCausalLM
from mixcon.integrations.transformers import MixConHFForCausalLM

EOS, PAD = 299, 298  # of the `tiny` preset's 300 ids
PROJECTIONS = ["in_proj", "out_proj", "qkv", "gate_up", "down"]  # Conba, attention, dense MLP (nn.Linear)
EXPERTS = ["ffn.w_gate_up", "ffn.w_down"]  # the MoE layers' stacked (n, out, in) expert weights
TARGETS = {"projections": dict(target_modules=PROJECTIONS), "experts": dict(target_parameters=EXPERTS)}


@pytest.fixture
def base(tiny_model) -> MixConForCausalLM:
    return tiny_model(eos_token_id=EOS, pad_token_id=PAD)  # fp64


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 290, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    return ids.masked_fill(mask == 0, PAD), mask


def wrapped(model: MixConForCausalLM, **lora: object) -> PeftModel:
    """A copy of `model` behind transformers' interface with LoRA adapters of rank 4."""
    torch.manual_seed(2)
    return get_peft_model(MixConHFForCausalLM.from_mixcon(copy.deepcopy(model)), LoraConfig(r=4, **lora))


@pytest.mark.parametrize("targets", TARGETS)
def test_adapters_decode_save_and_merge(base, targets, tmp_path):
    ids, mask = inputs()
    model = wrapped(base, init_lora_weights=False, **TARGETS[targets]).eval()  # random adapters, not the B = 0 start
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        assert (adapted - base(ids, attention_mask=mask).logits).abs().max() > 1e-2
    runs = [model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=use)
            for use in (True, False)]
    assert torch.equal(runs[0], runs[1])  # the decoding step sees the adapters as the full forward does

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(MixConHFForCausalLM.from_mixcon(copy.deepcopy(base)), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids, attention_mask=mask).logits, adapted)

    merged = model.merge_and_unload()
    assert isinstance(merged, MixConHFForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, attention_mask=mask).logits, adapted, rtol=1e-9, atol=1e-9)
    merged.save_pretrained(tmp_path / "merged")
    back = MixConForCausalLM.from_pretrained(tmp_path / "merged").double().eval()  # loads in fp32
    with torch.no_grad():
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, adapted, rtol=1e-5, atol=1e-5)


def lora_training(base: MixConForCausalLM, ids: torch.Tensor, checkpointing: bool) -> list[float]:
    """Losses of 8 AdamW steps on LoRA adapters of projections and experts; checks that only adapters move."""
    model = wrapped(base, target_modules=PROJECTIONS, target_parameters=EXPERTS)
    with torch.no_grad():  # LoRA's B starts at 0: the base model's outputs
        assert torch.equal(model.eval()(input_ids=ids).logits, base(ids).logits)
    if checkpointing:
        model.activation_checkpointing_enable()
        assert any(getattr(m, "recompute", None) is not None for m in model.modules())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW(trainable.values(), lr=2e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    return losses


def test_training_moves_only_the_adapters_with_or_without_activation_checkpointing(base):
    ids, _ = inputs()
    losses = lora_training(base, ids, checkpointing=False)
    assert losses[-1] < losses[0] - 0.1
    assert lora_training(base, ids, checkpointing=True) == pytest.approx(losses, rel=1e-12)


@pytest.mark.parametrize("targets", TARGETS)
def test_adapters_save_and_load_with_activation_checkpointing_on(base, targets, tmp_path):
    """Checkpointing keeps the modules' names, by which PEFT saves adapters and loads them (layers wrapped in
    torch's CheckpointWrapper saved none, and loaded none, silently)."""
    ids, mask = inputs()
    model = wrapped(base, init_lora_weights=False, **TARGETS[targets]).eval()
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
    model.activation_checkpointing_enable()
    model.save_pretrained(tmp_path / "adapter")
    fresh = MixConHFForCausalLM.from_mixcon(copy.deepcopy(base))
    fresh.activation_checkpointing_enable()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert len(loaded.state_dict()) == len(model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids, attention_mask=mask).logits, adapted)


def test_prompt_tuning_trains_only_the_virtual_tokens(base):
    """PEFT's prompt tuning prepends learned vectors through inputs_embeds: its forward is the model's forward on
    [prompt vectors, embeddings], and training moves the prompt alone."""
    hf = MixConHFForCausalLM.from_mixcon(copy.deepcopy(base)).train()
    torch.manual_seed(3)
    model = get_peft_model(hf, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ids = torch.randint(0, 290, (2, 10), generator=torch.Generator().manual_seed(4))
    prompt = model.get_prompt(batch_size=2)  # (2, 4, d_model)
    out = model(input_ids=ids, labels=ids)
    want = hf.model(inputs_embeds=torch.cat([prompt, hf.model.embed(ids)], 1)).logits
    torch.testing.assert_close(out.logits, want, rtol=1e-9, atol=1e-9)
    frozen = {n: p.detach().clone() for n, p in hf.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in hf.named_parameters())


def test_a_prompt_tuned_model_generates_after_its_virtual_tokens(base):
    """PEFT's generate for prompt tuning hands the wrapper's generate [prompt vectors, embeddings] as
    inputs_embeds: each new token is the argmax of the full forward over those and the tokens so far."""
    hf = MixConHFForCausalLM.from_mixcon(copy.deepcopy(base)).eval()
    torch.manual_seed(3)
    model = get_peft_model(hf, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    ids, mask = inputs()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    prompt = model.get_prompt(batch_size=2).detach()
    tokens = ids
    with torch.no_grad():
        for step in range(5):
            embeds = torch.cat([prompt, hf.model.embed(tokens)], 1)
            full_mask = torch.cat([torch.ones(2, 4, dtype=mask.dtype), mask, torch.ones_like(tokens[:, 12:])], 1)
            logits = hf(inputs_embeds=embeds, attention_mask=full_mask, use_cache=False).logits[:, -1]
            if step == 0:  # the virtual tokens count
                assert not torch.allclose(logits, hf(ids, attention_mask=mask).logits[:, -1])
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out[:, -5:], tokens[:, 12:])
