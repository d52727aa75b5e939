"""npgpt's training step against PyTorch autograd on the same weights and batch.

The oracle is transformers' GPT2LMHeadModel built from a GPT2Config (nothing is
downloaded) with npgpt's parameters loaded into it, trained with torch.optim.AdamW,
torch.nn.utils.clip_grad_norm_ and a LambdaLR schedule. Everything runs in float32;
the tolerances below are float32 round-off of a handful of reductions, stated per check:

    logits                  max |diff| <= 2e-5                (logits are O(1))
    loss                    relative 1e-6
    each gradient           ||ours - torch|| / ||torch|| <= 2e-5 (norm-wise, per tensor)
    params after 10 steps   max |diff| <= 2e-6                (lr 1e-3: 10 steps move ~1e-2)

Also: the same training step on every test backend (array-api-strict included) gives
the NumPy result.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from npgpt.backend import get_backend  # noqa: E402
from npgpt.config import GPTConfig  # noqa: E402
from npgpt.layers import IGNORE_INDEX  # noqa: E402
from npgpt.model import GPT, init_params  # noqa: E402
from npgpt.optim import AdamW, clip_grad_norm, cosine_lr, default_decay  # noqa: E402

CFG = GPTConfig(vocab_size=37, n_ctx=16, n_embd=16, n_head=4, n_layer=2)
B, T = 3, 12
STEPS, MAX_LR, MIN_LR, WARMUP, MAX_NORM, WD = 10, 1e-3, 1e-4, 3, 0.5, 0.1


def host_params() -> dict[str, np.ndarray]:
    """GPT-2 init plus noise on biases and LayerNorm, so no gradient is trivially zero."""
    params = init_params(CFG, seed=0)
    rng = np.random.default_rng(1)
    for name, value in params.items():
        if value.ndim == 1:
            params[name] = (value + 0.1 * rng.standard_normal(value.shape)).astype(np.float32)
    return params


def batches(n: int):
    rng = np.random.default_rng(2)
    for _ in range(n):
        ids = rng.integers(0, CFG.vocab_size, size=(B, T))
        targets = rng.integers(0, CFG.vocab_size, size=(B, T))
        targets[0, :3] = IGNORE_INDEX  # some ignored positions
        yield ids, targets


def torch_model(params):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=CFG.vocab_size, n_positions=CFG.n_ctx, n_embd=CFG.n_embd,
                                    n_layer=CFG.n_layer, n_head=CFG.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, layer_norm_epsilon=CFG.layer_norm_epsilon,
                                    activation_function="gelu_new", bos_token_id=None, eos_token_id=None,
                                    attn_implementation="eager"))  # fmt: skip
    missing, unexpected = hf.load_state_dict({f"transformer.{k}": torch.from_numpy(v.copy()) for k, v in params.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} | {k for k in missing if k.endswith("attn.bias")}
    assert hf.lm_head.weight is hf.transformer.wte.weight  # tied
    return hf.train()


def torch_params(hf) -> dict:
    return {name.removeprefix("transformer."): p for name, p in hf.named_parameters() if name.startswith("transformer.")}


def torch_loss(hf, ids, targets):
    logits = hf(torch.from_numpy(ids)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), torch.from_numpy(targets).reshape(-1), ignore_index=IGNORE_INDEX)
    return logits, loss


def test_logits_loss_and_every_gradient_match_pytorch():
    params = host_params()
    ours = GPT.from_numpy(CFG, params)
    hf = torch_model(params)
    ids, targets = next(batches(1))

    logits, loss = torch_loss(hf, ids, targets)
    loss.backward()
    np.testing.assert_allclose(np.asarray(ours.forward(ids)), logits.detach().numpy(), rtol=0, atol=2e-5)
    our_loss, grads = ours.loss_and_grads(ids, targets, ignore_index=IGNORE_INDEX)
    np.testing.assert_allclose(float(our_loss), loss.item(), rtol=1e-6)
    reference = torch_params(hf)
    assert set(grads) == set(reference)
    for name, p in reference.items():
        g = p.grad.numpy()
        err = np.linalg.norm(np.asarray(grads[name]) - g) / np.linalg.norm(g)
        assert err <= 2e-5, f"{name}: relative gradient error {err:.2e}"


def test_ten_adamw_steps_with_clipping_and_schedule_match_pytorch():
    params = host_params()
    ours = GPT.from_numpy(CFG, {k: v.copy() for k, v in params.items()})  # NumPy would alias them
    opt = AdamW(ours.params, ours.backend, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    hf = torch_model(params)
    named = torch_params(hf)
    decay = [p for n, p in named.items() if default_decay(n, tuple(p.shape))]
    no_decay = [p for n, p in named.items() if not default_decay(n, tuple(p.shape))]
    assert len(decay) == 4 * CFG.n_layer  # c_attn, attn c_proj, c_fc, mlp c_proj
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=MAX_LR, betas=(0.9, 0.95), eps=1e-8, foreach=False)  # fmt: skip
    schedule = lambda step: cosine_lr(step, MAX_LR, MIN_LR, WARMUP, STEPS) / MAX_LR  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(topt, schedule)

    clipped = 0
    for step, (ids, targets) in enumerate(batches(STEPS)):
        _, loss = torch_loss(hf, ids, targets)
        topt.zero_grad()
        loss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(hf.parameters(), MAX_NORM)
        topt.step()
        sched.step()

        _, grads = ours.loss_and_grads(ids, targets, ignore_index=IGNORE_INDEX)
        norm = clip_grad_norm(grads, MAX_NORM, ours.backend)
        opt.step(grads, cosine_lr(step, MAX_LR, MIN_LR, WARMUP, STEPS))
        np.testing.assert_allclose(float(norm), tnorm.item(), rtol=1e-5)
        clipped += tnorm.item() > MAX_NORM
    assert clipped >= 5, "the clipping branch must be exercised"
    for name, p in named.items():
        moved = np.abs(p.detach().numpy() - params[name]).max()
        diff = np.abs(np.asarray(ours.params[name]) - p.detach().numpy()).max()
        assert moved > 1e-4, f"{name} barely moved"
        assert diff <= 2e-6, f"{name}: max |ours - torch| {diff:.2e} after {STEPS} steps"


def train_steps(backend, steps=3):
    """A few AdamW steps on `backend` from the same start and batches; params on host."""
    model = GPT.from_numpy(CFG, host_params(), backend)
    opt = AdamW(model.params, model.backend)
    for step, (ids, targets) in enumerate(batches(steps)):
        _, grads = model.loss_and_grads(ids, targets, ignore_index=IGNORE_INDEX)
        clip_grad_norm(grads, MAX_NORM, model.backend)
        opt.step(grads, cosine_lr(step, MAX_LR, MIN_LR, 1, steps))
    return model.to_numpy()


def test_training_step_is_the_same_on_every_backend(backend):
    reference = train_steps(get_backend("numpy"))
    result = train_steps(backend)
    for name, value in reference.items():
        # the portable scatter-add (a one-hot matmul) rounds differently from np.add.at
        np.testing.assert_allclose(result[name], value, rtol=0, atol=1e-6, err_msg=name)
