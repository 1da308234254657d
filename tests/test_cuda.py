"""What only a GPU runs: bf16 and fp16 training, compiled layers and the attention kernels they run, gradient
checkpointing, DDP over nccl, unpadded batches without a mask, no host sync per step. Skipped without CUDA
(scripts/gpu_check.py runs them first).

The model and data come from scripts/make_tiny.py (a plain WordPiece BERT, no MeCab), so this file runs where only
torch and transformers are installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bertcls
import common
import data
import make_tiny
import models
from conftest import REPO, finished_runs, train_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A 2-layer random BERT (head size 64, as BERT-base's) and 300 articles of more than 64 tokens: at
    --max_seq_len 64 every batch is full and unpadded."""
    root = tmp_path_factory.mktemp("cuda")
    model, corpus = root / "model", root / "tiny.jsonl"
    assert make_tiny.main(["--model_dir", str(model), "--data", str(corpus), "--per_category", "100", "--hidden", "128",
                           "--min_sentences", "3", "--max_sentences", "6", "--vocab_size", "256"]) == 0
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    names = sorted({r["category"] for r in rows})
    dataset = root / "dataset"
    dataset.mkdir()
    (dataset / "label2id.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
    for split, part in (("train", rows[:240]), ("val", rows[240:270]), ("test", rows[270:])):
        (dataset / f"{split}.jsonl").write_text("".join(json.dumps({**r, "label": r["category"]}) + "\n" for r in part))
    return SimpleNamespace(model=model, dataset=dataset)


def cuda_args(tiny: SimpleNamespace, output_dir: Path, *extra: str) -> list[str]:
    # at 3e-3 about one dropout draw in four leaves two classes merged for all 6 epochs; at 1e-3 every draw learned
    return train_args(tiny.model, tiny.dataset, output_dir, "--device", "cuda", "--epochs", "6", "--lr", "1e-3", *extra)


def finished(output_dir: Path) -> tuple[dict, dict]:
    (run_dir,) = finished_runs(output_dir)
    return tuple(json.loads((run_dir / name).read_text()) for name in ("config.json", "test-metrics.json"))


def test_auto_dtype_and_current_device_follow_the_chosen_gpu():
    device = common.pick_device("cuda")
    assert device == torch.device("cuda", torch.cuda.current_device())
    native = torch.cuda.get_device_capability(device) >= (8, 0)
    assert common.resolve_dtype("auto", device) == (torch.bfloat16 if native else torch.float16)


@pytest.mark.parametrize("flags, dtype", [(["--dtype", "bf16"], "bfloat16"),
                                          (["--dtype", "bf16", "--compile"], "bfloat16"),
                                          (["--dtype", "fp16"], "float16")])
def test_runs_learn(tiny, tmp_path, flags, dtype):
    assert bertcls.main(cuda_args(tiny, tmp_path, *flags)) == 0
    config, metrics = finished(tmp_path)
    assert config["device"].startswith("cuda:") and config["dtype"] == dtype
    assert config["args"]["compile"] == ("--compile" in flags)
    assert metrics["accuracy"] >= 0.75  # 3 classes: chance is about 0.33


def attention_kernels(model: torch.nn.Module, batch: dict, steps: int = 2) -> tuple[list[str], list[str]]:
    """Names of the CUDA kernels that ran in a few training steps: fused attention ones, and softmax ones."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(**batch).logits.float().sum().backward()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    fused = [n for n in names if any(k in n.lower() for k in ("flash", "fmha", "cudnn", "sdpa", "attention"))]
    return fused, [n for n in names if "softmax" in n.lower()]


def test_compiled_layers_run_the_fused_attention_kernels(tiny):
    """The compiled training step runs the flash / cuDNN attention kernels eager mode picks, not a softmax between
    two matmuls (what compiling the whole model produced on an H100 and an H200)."""
    model = models.load_model(str(tiny.model), {"a": 0, "b": 1, "c": 2}).cuda().train()
    batch = {"input_ids": torch.randint(5, 200, (8, 128), device="cuda")}
    eager_fused, eager_softmax = attention_kernels(model, batch)
    assert eager_fused and not eager_softmax, (eager_fused, eager_softmax)
    assert models.compile_layers(model) == 2
    compiled_fused, compiled_softmax = attention_kernels(model, batch)
    assert compiled_fused and not compiled_softmax, (compiled_fused, compiled_softmax)


def test_gradient_checkpointing_recomputes_the_same_gradients(tiny):
    """Checkpointed layers run again in backward with the same dropout masks: the same gradients."""
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = models.load_model(str(tiny.model), {"a": 0, "b": 1, "c": 2})
        args = SimpleNamespace(gradient_checkpointing=checkpointing, compile=False)
        wrapped = bertcls.wrap_model(SimpleNamespace(model=model, device=torch.device("cuda"), args=args))
        wrapped.train()
        torch.manual_seed(1)
        wrapped(input_ids=torch.randint(5, 100, (4, 64), device="cuda"),
                labels=torch.tensor([0, 1, 2, 0], device="cuda")).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, rtol=1e-4, atol=1e-6)


def test_one_process_torchrun_trains_with_ddp_over_nccl(tiny, tmp_path):
    script = tmp_path / "record_ddp.py"
    script.write_text("import sys\nimport torch.distributed as dist\nimport bertcls\nwrap = bertcls.wrap_model\n"
                      "def recording(run):\n    model = wrap(run)\n"
                      "    print(f'wrapped: {type(model).__name__} backend: {dist.get_backend()}', file=sys.stderr)\n"
                      "    return model\nbertcls.wrap_model = recording\nsys.exit(bertcls.main())\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script),
               *cuda_args(tiny, tmp_path / "out", "--epochs", "2")]
    result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrapped: DistributedDataParallel backend: nccl" in result.stderr
    config, _ = finished(tmp_path / "out")
    assert config["device"] == "cuda:0" and config["world_size"] == 1


def test_unpadded_batch_without_a_mask_matches_the_masked_one(tiny):
    """Without a mask SDPA may take the flash kernel; with an all-ones mask it cannot: the same logits (to bf16)."""
    model = models.load_model(str(tiny.model), {"a": 0, "b": 1, "c": 2}).cuda().eval()
    packed = {"offsets": torch.arange(0, 5 * 64, 64), "input_ids": torch.randint(5, 100, (4 * 64,), dtype=torch.int32)}
    batch = data.Inputs(packed, torch.zeros(4, dtype=torch.long), 0).batch([0, 1, 2, 3], torch.device("cuda"))
    batch.pop("labels")
    assert "attention_mask" not in batch
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        unmasked = model(**batch).logits.float()
        masked = model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).logits.float()
    torch.testing.assert_close(unmasked, masked, rtol=2e-2, atol=2e-2)


def test_training_steps_make_no_host_sync(tiny, tmp_path):
    """Only train_epoch's end waits for the GPU (the NaN check and the mean loss): none per step."""
    args = bertcls.parse_args(cuda_args(tiny, tmp_path, "--dtype", "bf16", "--log_interval", "1000"))
    run = bertcls.set_up(args, 0, 1, False, lambda line: None)
    epochs, schedule = bertcls.plan(run)
    model, optimizer = bertcls.wrap_model(run), bertcls.build_optimizer(run.model, args)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    first, rest = epochs[0][:2], epochs[0][2:]
    bertcls.train_epoch(model, optimizer, scaler, run.data["train"], first, bertcls.step_sizes(first, 1, 1), args,
                        schedule, 0, run.ctx, run.device)  # first steps: the allocator, the optimizer's state
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            bertcls.train_epoch(model, optimizer, scaler, run.data["train"], rest, bertcls.step_sizes(rest, 1, 1),
                                args, schedule, 2, run.ctx, run.device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(rest) >= 8 and len(syncs) == 2, syncs  # none would mean the check sees nothing
