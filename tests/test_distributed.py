"""DDP under torchrun (gloo on CPU) and gradient accumulation."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bertcls
import checkpoints
import common
import data
import families
from conftest import (REPO, STOPPING_BERTCLS, finished_runs, kill_when_stopped, only_run, results, stopping_env,
                      train_args)

DDP_FLAGS = ("--epochs", "3", "--save_model", "--gradient_checkpointing", "--eval_batch_size", "8")


def torchrun(args: list[str], cwd: Path, script: Path = REPO / "bertcls.py") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_run(tiny_bert, tiny_dataset, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("ddp")
    result = torchrun(train_args(tiny_bert, tiny_dataset, output_dir, *DDP_FLAGS), output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = finished_runs(output_dir)
    return run_dir


def test_two_process_run_writes_its_metrics_once(ddp_run):
    config = json.loads((ddp_run / "config.json").read_text(encoding="utf-8"))
    assert config["world_size"] == 2
    assert config["effective_batch_size"] == 16
    # 80 train examples / (8 per device x 2 ranks) = 5 optimizer steps per epoch
    assert config["total_optimizer_steps"] == 15
    assert len(list(ddp_run.parent.iterdir())) == 1  # only rank 0 made a run directory
    # 20 val/test examples in batches of 8: rank 0 evaluates 2 batches, rank 1 one, without deadlock
    log = list(csv.DictReader((ddp_run / "log.csv").open(encoding="utf-8")))
    assert len(log) == 3
    assert float(log[0]["examples_per_s"]) > 0


def test_distributed_test_metrics_equal_single_process_evaluation(ddp_run, tiny_dataset, tiny_rows):
    from transformers import AutoModelForSequenceClassification

    model_dir = ddp_run / "model"
    dtype = getattr(torch, json.loads((ddp_run / "config.json").read_text(encoding="utf-8"))["dtype"])  # as the run
    attention = families.attention_implementation(torch.device("cpu"), dtype)  # as the run
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation=attention)
    tokenizer = families.load_tokenizer(str(model_dir))
    label2id = data.load_label2id(tiny_dataset)
    rows = data.load_split(tiny_dataset, "test", label2id)
    spec = data.InputSpec(64, families.uses_token_type_ids(model.config))
    packed = data.pack(data.tokenize_rows(tokenizer, rows, spec))
    labels = torch.tensor([r["label"] for r in rows])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker ran, so the float sums are the same
    try:
        run = SimpleNamespace(packed={"test": packed}, labels={"test": labels},
                              id2label={i: n for n, i in label2id.items()},
                              args=SimpleNamespace(eval_batch_size=16, max_batch_tokens=None),
                              device=torch.device("cpu"),
                              ctx=common.autocast_context(torch.device("cpu"), dtype), pad_id=0, rank=0,
                              world_size=1, buckets=None)
        metrics, _ = bertcls.evaluate(model, run, "test")
    finally:
        torch.set_num_threads(threads)
    recorded = json.loads((ddp_run / "test-metrics.json").read_text(encoding="utf-8"))
    assert sum(recorded["per_class"][name]["support"] for name in label2id) == len(tiny_rows["test"])
    assert metrics == recorded


def test_two_process_modernbert_run_with_head_tail_and_a_token_budget(tiny_modernbert, tiny_dataset, tmp_path):
    import predict
    output_dir = tmp_path / "out"
    result = torchrun(train_args(tiny_modernbert, tiny_dataset, output_dir, "--epochs", "1", "--save_model",
                                 "--truncation", "head_tail", "--max_seq_len", "32", "--max_batch_tokens", "128"),
                      tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = finished_runs(output_dir)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["world_size"] == 2 and config["args"]["truncation"] == "head_tail"
    metrics = json.loads((run_dir / "test-metrics.json").read_text(encoding="utf-8"))
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 20  # every test example once
    # the saved model, read by one process, predicts what the two evaluated
    out = tmp_path / "predictions.jsonl"
    assert predict.main(["--model_dir", str(run_dir / "model"), "--input", str(tiny_dataset / "test.jsonl"),
                         "--output", str(out)]) == 0
    expected = [json.loads(line)["predicted"] for line in (run_dir / "test-predictions.jsonl").open(encoding="utf-8")]
    assert [json.loads(line)["label"] for line in out.open(encoding="utf-8")] == expected


def test_resume_under_torchrun_equals_the_uninterrupted_run(ddp_run, tiny_bert, tiny_dataset, tmp_path):
    """Both ranks SIGKILLed in epoch 3, then torchrun ... --resume: the ranks continue from the same checkpoint,
    each with its own random states, and the results equal those of the run never interrupted."""
    script = tmp_path / "stopping_bertcls.py"
    script.write_text(STOPPING_BERTCLS, encoding="utf-8")
    args = train_args(tiny_bert, tiny_dataset, tmp_path / "out", *DDP_FLAGS, "--checkpoint_minutes", "0")
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                str(script), *args], cwd=tmp_path, env=stopping_env(tmp_path / "stopped", 3, 2),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when_stopped(process, tmp_path / "stopped", processes=2)
    assert process.returncode != 0
    run_dir = only_run(tmp_path / "out")
    run_id = checkpoints.run_identity(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
    checkpoint = checkpoints.read_checkpoint(run_dir / "checkpoint-epoch2", run_id)
    assert len(checkpoint["state"]["rng"]) == 2  # one per rank
    resumed = torchrun(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 2 (optimizer step 10)" in resumed.stderr
    assert results(run_dir) == results(ddp_run)
    assert len(list(run_dir.parent.iterdir())) == 1 and not list(run_dir.glob("checkpoint-*"))


def test_a_failing_rank_fails_the_job_without_metrics(tiny_bert, tiny_dataset, tmp_path):
    failing = tmp_path / "fail_rank1.py"
    failing.write_text(
        "import os, sys\n"
        "import bertcls\n"
        "original = bertcls.train_epoch\n"
        "def train_epoch(*args, **kwargs):\n"
        "    if os.environ['RANK'] == '1' and kwargs['epoch'] == 2:\n"
        "        raise RuntimeError('simulated failure of rank 1')\n"
        "    return original(*args, **kwargs)\n"
        "bertcls.train_epoch = train_epoch\n"
        "sys.exit(bertcls.main())\n", encoding="utf-8")
    output_dir = tmp_path / "out"
    result = torchrun(train_args(tiny_bert, tiny_dataset, output_dir, "--epochs", "3"), tmp_path, failing)
    assert result.returncode != 0
    assert "bertcls.py [rank 1]: error: RuntimeError: simulated failure of rank 1 (traceback below)" in result.stderr
    assert list(output_dir.rglob("config.json"))  # the run started...
    assert not list(output_dir.rglob("*metrics.json"))  # ...and is not counted as finished


def test_accumulation_follows_the_schedule_of_the_larger_batch(tiny_bert, tiny_dataset, tmp_path):
    records = {}
    for name, flags in {"accumulated": ["--batch_size", "4", "--grad_accum_steps", "2"],
                        "plain": ["--batch_size", "8"]}.items():
        output_dir = tmp_path / name
        args = train_args(tiny_bert, tiny_dataset, output_dir, "--epochs", "2", *flags)
        assert bertcls.main(args) == 0
        (run_dir,) = finished_runs(output_dir)
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        log = list(csv.DictReader((run_dir / "log.csv").open(encoding="utf-8")))
        records[name] = (config["total_optimizer_steps"], config["warmup_steps"],
                         config["effective_batch_size"], [float(r["lr"]) for r in log])
    assert records["accumulated"] == records["plain"]
    assert records["plain"][0] == 2 * 10


def test_accumulated_gradients_equal_one_large_batch(tiny_bert, tiny_dataset):
    """Two micro-batches of 4 with accumulation take the same optimizer step as one batch of 8."""
    from transformers import AutoModelForSequenceClassification

    label2id = data.load_label2id(tiny_dataset)
    rows = data.load_split(tiny_dataset, "train", label2id)[:13]
    tokenizer = families.load_tokenizer(str(tiny_bert))
    packed = data.pack(data.tokenize_rows(tokenizer, rows, data.InputSpec(64, True)))
    labels = torch.tensor([r["label"] for r in rows])
    states = []
    for batches, accumulation in [([list(range(8)), list(range(8, 13))], 1),
                                  ([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10], [11, 12]], 2)]:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            tiny_bert, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        # plain SGD: the step is proportional to the gradient (Adam's first step is ~sign(gradient))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        run = SimpleNamespace(packed={"train": packed}, labels={"train": labels}, device=torch.device("cpu"),
                              ctx=common.autocast_context(torch.device("cpu"), torch.float32), pad_id=0, buckets=None,
                              total_steps=2, warmup_steps=0,
                              args=SimpleNamespace(lr=0.5, grad_accum_steps=accumulation, max_grad_norm=1.0,
                                                   log_interval=1))
        bertcls.train_epoch(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), run, batches, step=0,
                            epoch=1)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    initial = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).state_dict()
    moved = [k for k in states[0] if not torch.equal(states[0][k], initial[k]) and "classifier" not in k]
    assert moved, "training changed nothing: the comparison would be vacuous"
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-5, atol=1e-6)


def test_torchrun_with_one_process_is_a_ddp_job(tiny_bert, tiny_dataset, tmp_path, monkeypatch):
    """torchrun --nproc_per_node 1 makes the process group and wraps the model in DDP (nccl on one GPU is then
    exercised too); a plain run does neither."""
    import socket
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    env = common.dist_env()
    run = bertcls.Run(bertcls.parse_args(train_args(tiny_bert, tiny_dataset, tmp_path)), log=lambda message: None)
    try:
        assert bertcls.init_distributed("cpu", env) == torch.device("cpu")
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert type(bertcls.wrap_model(run)).__name__ == "DistributedDataParallel"
    finally:
        bertcls.destroy_distributed()
    assert not dist.is_initialized()
    assert bertcls.init_distributed("cpu", env._replace(torchrun=False)) == torch.device("cpu")
    assert not dist.is_initialized() and bertcls.wrap_model(run) is run.raw_model


def test_gradient_checkpointing_where_transformers_names_it_the_old_way(tiny_bert, monkeypatch):
    """transformers before activation_checkpointing_enable (5.17 among them) has only gradient_checkpointing_enable."""
    from transformers import AutoModelForSequenceClassification
    from transformers import PreTrainedModel
    calls = []
    # what enables checkpointing here: the renamed method's body, or (older transformers) the old method itself
    enable = getattr(PreTrainedModel, "_activation_checkpointing_enable", PreTrainedModel.gradient_checkpointing_enable)

    def old_enable(self, gradient_checkpointing_kwargs=None):
        calls.append(gradient_checkpointing_kwargs)
        enable(self, gradient_checkpointing_kwargs)

    monkeypatch.delattr(PreTrainedModel, "activation_checkpointing_enable", raising=False)
    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", old_enable)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    run = SimpleNamespace(raw_model=model, device=torch.device("cpu"), world_size=1,
                          args=SimpleNamespace(gradient_checkpointing=True, compile=False))
    assert bertcls.wrap_model(run).is_gradient_checkpointing
    assert calls == [{"use_reentrant": False}]
