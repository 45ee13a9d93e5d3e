"""Activation checkpointing (issue 50 item 3): ``trainer.activation_checkpointing=stage|block`` recomputes the
sparse encoder's blocks (and the fine-tuning model's) in the backward: the same gradients as without it, drop
path included, and fewer activations kept (measured as the bytes autograd saves between forward and backward)."""
import pytest
import torch

from fcmae.config import ConfigError
from fcmae.models import create_fcmae


def saved_bytes_and_grads(model, run):
    """Bytes of the distinct tensors autograd keeps for the backward, and every parameter's grad."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # drop path draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    return sum(storages.values()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_sparse_encoder_recomputes_with_the_same_gradients_and_keeps_less():
    torch.manual_seed(0)
    model = create_fcmae("convnextv2_atto", drop_path_rate=0.2, dwconv="canvas").train()
    imgs = torch.randn(2, 3, 128, 128)
    mask = torch.tensor([[0, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 1, 0]])
    results = {}
    for how in ("off", "stage", "block"):
        model.encoder.activation_checkpointing = how
        results[how] = saved_bytes_and_grads(model, lambda: model(imgs, mask=mask)[0])
    off_bytes, off_grads = results["off"]
    for how in ("stage", "block"):
        nbytes, grads = results[how]
        assert grads.keys() == off_grads.keys()
        for name, g in grads.items():
            assert torch.allclose(g, off_grads[name], rtol=1e-5, atol=1e-7), (how, name)
        assert nbytes < 0.6 * off_bytes, (how, nbytes, off_bytes)
    assert results["stage"][0] < results["block"][0]  # a stage keeps only its input
    print(f"saved activations, atto b2 128 px: off {off_bytes / 2**20:.2f} MiB, block "
          f"{results['block'][0] / 2**20:.2f}, stage {results['stage'][0] / 2**20:.2f}")


def test_the_fine_tuning_model_recomputes_with_the_same_gradients_and_keeps_less():
    from fcmae.finetune import build_classifier, set_activation_checkpointing
    results = {}
    imgs, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    for how in ("off", "stage", "block"):
        torch.manual_seed(0)
        model = build_classifier("convnextv2_atto", 4, 0.2, 1.0).train()
        set_activation_checkpointing(model, how)
        results[how] = saved_bytes_and_grads(model, lambda: torch.nn.functional.cross_entropy(model(imgs), y))
    for how in ("stage", "block"):
        for name, g in results[how][1].items():
            assert torch.allclose(g, results["off"][1][name], rtol=1e-5, atol=1e-7), (how, name)
        assert results[how][0] < 0.6 * results["off"][0]


def test_checkpointing_a_backend_without_blocks_to_recompute_is_refused(tmp_path):
    from fcmae.pretrain import run
    from test_pretrain import make_cfg
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing=block recomputes the sparse backend"):
        run(make_cfg("encoder.backend=dense", "trainer.activation_checkpointing=block"), tmp_path)
    with pytest.raises(ConfigError, match="use off, stage or block"):
        run(make_cfg("trainer.activation_checkpointing=layer"), tmp_path)


def test_a_run_with_checkpointing_trains_and_resumes_like_one_without(tmp_path):
    from fcmae.pretrain import run
    from fcmae.storage.checkpoint import load_checkpoint
    from test_pretrain import make_cfg
    run(make_cfg("trainer.max_steps=2"), tmp_path / "plain")
    run(make_cfg("trainer.max_steps=1", "trainer.activation_checkpointing=block"), tmp_path / "ckpt")
    run(make_cfg("trainer.max_steps=2", "trainer.activation_checkpointing=stage"), tmp_path / "ckpt")  # resumed
    a = load_checkpoint(tmp_path / "plain/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "ckpt/checkpoints/last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
