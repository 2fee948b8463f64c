"""Config mode trains models from other libraries without glue (issue 30): Hugging Face outputs (with
and without ``model.pass_labels``), torchvision's named-tuple and dict outputs with auxiliary heads, and
a user's ``train.loss``. Each real job (``lmsrun -np 2``, mpirun, swap engine on) matches a hand-written
two-rank loop with the same seed bit for bit: every step's loss and the final weights. An output lmsdp
cannot read is one line, exit 2, before the first step. The jobs run once per module, a few at a time."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmsdp.launcher.config import load_config
from lmsdp.launcher.train.data import make_batches
from lmsdp.launcher.config import ConfigError
from lmsdp.launcher.train.loss import StepLoss, read_output
from tests.support import LMSRUN, REPO, SCRIPTS

from lmsdp.launcher.models import aux_heads

if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)  # foreign_outputs: the factories of the user-loss and unreadable cases
import foreign_outputs  # noqa: E402

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
NO_TRANSFORMERS = "transformers is not importable here (pip install transformers; scripts/setup.sh does)"
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason=NO_TRANSFORMERS)

SEED, STEPS, BATCH, LR, MOMENTUM, AUX = 3, 3, 4, 0.05, 0.9, 0.3
GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 16, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0}
BERT = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 64, "max_position_embeddings": 16, "num_labels": 4, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
SWAP = ["swap.enabled=true", "swap.threshold=0", "swap.keep_last=0", "swap.prefetch=2", "swap.transport=loopback"]


def _yaml(value: Dict[str, Any]) -> str:
    return json.dumps(value)  # JSON is YAML: one --set value


@dataclasses.dataclass
class Case:
    """One job: its --set overrides, and the hand-written model and loss of the reference loop."""

    overrides: List[str]
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    np: int = 2
    hf: bool = False


def _hf(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


CASES: Dict[str, Case] = {
    "gpt2-labels": Case(  # a class-method factory; GPT-2 shifts labels=input_ids itself and returns .loss
        ["model.factory=transformers:AutoModelForCausalLM.from_config", "model.config_factory=transformers:GPT2Config",
         f"model.kwargs={_yaml(GPT2)}", "model.pass_labels=true", "data.task=lm", "data.shape=[16]", "data.classes=64"],
        lambda: _hf("GPT2LMHeadModel")(_hf("GPT2Config")(**GPT2)),
        lambda model, x, y: model(x, labels=x).loss, hf=True),
    "gpt2-logits": Case(  # .logits read from the output object; the task's loss against the shifted targets
        ["model.factory=transformers:GPT2LMHeadModel", "model.config_factory=transformers:GPT2Config",
         f"model.kwargs={_yaml(GPT2)}", "data.task=lm", "data.shape=[16]", "data.classes=64"],
        lambda: _hf("GPT2LMHeadModel")(_hf("GPT2Config")(**GPT2)),
        lambda model, x, y: F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()), hf=True),
    "bert": Case(  # sequence classification on token ids (data.vocab), labels passed
        ["model.factory=transformers:BertForSequenceClassification", "model.config_factory=transformers:BertConfig",
         f"model.kwargs={_yaml(BERT)}", "model.pass_labels=true", "data.task=classify", "data.shape=[16]",
         "data.classes=4", "data.vocab=64"],
        lambda: _hf("BertForSequenceClassification")(_hf("BertConfig")(**BERT)),
        lambda model, x, y: model(x, labels=y).loss, hf=True),
    "googlenet": Case(  # GoogLeNetOutputs(logits, aux_logits2, aux_logits1)
        ["model.factory=lmsdp.launcher.models.aux_heads:googlenet", "model.kwargs={num_classes: 10, width: 32, layers: 2}",
         "data.task=classify", "data.shape=[3, 8, 8]", "data.classes=10", f"train.aux_weight={AUX}"],
        lambda: aux_heads.googlenet(10, 32, 2),
        lambda model, x, y: _googlenet_loss(model(x), y)),
    "fcn-dict": Case(  # {'out': ..., 'aux': ...}, per-pixel classes
        ["model.factory=lmsdp.launcher.models.aux_heads:fcn", "model.kwargs={num_classes: 4, width: 32, layers: 2}",
         "data.task=segment", "data.shape=[3, 8, 8]", "data.classes=4", f"train.aux_weight={AUX}"],
        lambda: aux_heads.fcn(4, 32, 2),
        lambda model, x, y: _fcn_loss(model(x), y)),
    "user-loss": Case(  # an output no reader knows, trained through train.loss
        ["model.factory=foreign_outputs:scores_net", "model.kwargs={inputs: 12, width: 32, classes: 4, layers: 2}",
         "train.loss=foreign_outputs:scores_loss", "data.task=classify", "data.shape=[12]", "data.classes=4"],
        lambda: foreign_outputs.scores_net(12, 32, 4, 2),
        lambda model, x, y: foreign_outputs.scores_loss(model(x), y)),
}
# A job that must stop with one line before the first step (the other first-step refusals raise the
# same ConfigError through the same path: they are checked in-process below).
FAILING: Dict[str, Tuple[List[str], int]] = {
    "unreadable": (["model.factory=foreign_outputs:scores_net", "data.task=classify", "data.shape=[12]",
                    "data.classes=4"], 2),
}


def _googlenet_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, y) + AUX * F.cross_entropy(out.aux_logits2, y) \
        + AUX * F.cross_entropy(out.aux_logits1, y)


def _fcn_loss(out: Dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out["out"], y) + AUX * F.cross_entropy(out["aux"], y)


# ------------------------------------------------------------------------------- the real jobs
def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_", "SLURM_"))}
    here = env.get("PYTHONPATH")
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=os.pathsep.join([SCRIPTS] + ([here] if here else [])))
    return env


def _argv(out: Path, overrides: List[str], np: int) -> List[str]:
    job = out.parent / "job.yaml"
    job.write_text("name: foreign\n")
    argv = [LMSRUN, str(job), "-np", str(np), "--threads", "1", "--output-dir", str(out)]
    for item in BASE + SWAP + overrides:
        argv += ["--set", item]
    return argv


BASE = [f"train.batch_size={BATCH}", f"train.steps={STEPS}", f"train.seed={SEED}", "train.progress=false",
        "train.deterministic=true", "comm.backend=torch", "optimizer.name=sgd", f"optimizer.lr={LR}",
        f"optimizer.momentum={MOMENTUM}"]


def _run_all(jobs: Dict[str, List[str]], root: Path) -> Dict[str, subprocess.CompletedProcess]:
    """Every job as a real lmsrun, a few at a time (each rank is one busy core)."""
    waiting, running, done, started = list(jobs.items()), {}, {}, {}
    at_once = max(1, (os.cpu_count() or 2) // 2)
    while waiting or running:
        while waiting and len(running) < at_once:
            name, argv = waiting.pop(0)
            started[name] = time.monotonic()
            running[name] = subprocess.Popen(argv, env=_env(), cwd=root, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                out, err = proc.communicate()
                print(f"[foreign] {name}: exit {proc.returncode} after {time.monotonic() - started[name]:.0f} s")
                done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
                del running[name]
        time.sleep(0.2)
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Tuple[Path, subprocess.CompletedProcess]]:
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    root = tmp_path_factory.mktemp("foreign")
    specs = {name: (case.overrides, case.np) for name, case in CASES.items() if HAS_TRANSFORMERS or not case.hf}
    specs.update(FAILING)
    jobs = {}
    for name, (overrides, np) in specs.items():
        (root / name).mkdir()
        jobs[name] = _argv(root / name / "out", overrides, np)
    finished = _run_all(jobs, root)
    return {name: (root / name / "out", proc) for name, proc in finished.items()}


def _metrics(out: Path, rank: int = 0) -> List[dict]:
    path = out / f"metrics.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------- the hand-written loop
def hand_loop(case: Case) -> Tuple[List[float], Dict[str, torch.Tensor]]:
    """Two ranks by hand: the same seed and batches, each rank's gradients averaged, SGD with momentum."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (--threads 1): same kernels, same sums
    try:
        torch.manual_seed(SEED)
        model = case.build()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
        config = load_config(None, BASE + case.overrides)  # the job's data: the same batches per rank
        sources = [make_batches(config, rank, 2)[0] for rank in (0, 1)]
        losses = []
        for step in range(STEPS):
            grads, rank_losses = [], []
            for source in sources:
                optimizer.zero_grad(set_to_none=True)
                x, y = source.batch(step)
                loss = case.loss(model, x, y)
                loss.backward()
                grads.append([p.grad.clone() for p in params])
                rank_losses.append(loss.detach().float())
            for p, g0, g1 in zip(params, *grads):
                p.grad = (g0 + g1) / 2
            optimizer.step()
            losses.append((rank_losses[0] + rank_losses[1]).item() / 2)
        return losses, model.state_dict()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration
@pytest.mark.mpi
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(CASES))
def test_job_matches_a_hand_written_loop_bit_for_bit(runs, name):
    case = CASES[name]
    if case.hf and not HAS_TRANSFORMERS:
        pytest.skip(NO_TRANSFORMERS)
    out, proc = runs[name]
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses, state = hand_loop(case)
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == losses
    assert all(r["swap_out_bytes"] > 0 for r in records)  # the swap engine really moved activations
    saved = torch.load(out / "checkpoints" / f"step-{STEPS:08d}.pt", weights_only=False)["model"]
    assert saved.keys() == state.keys()
    for key in state:
        assert torch.equal(saved[key], state[key]), f"{key} differs"
    assert losses[-1] != losses[0]  # it trained


@pytest.mark.integration
@pytest.mark.mpi
@pytest.mark.timeout(900)
def test_an_output_that_cannot_be_read_is_one_line_before_the_first_step(runs):
    out, proc = runs["unreadable"]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[lmsdp] ")]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr  # one line from two ranks
    for word in ("lmsrun: error: model: forward returned a foreign_outputs.Scores", "set train.loss",
                 "make forward return the logits"):
        assert word in lines[0], lines[0]
    assert _metrics(out) == [] and not list(out.glob("checkpoints/step-*.pt"))  # no step was taken


# -------------------------------------------------------------------------------- in-process checks
Outputs = namedtuple("Outputs", ["logits", "aux_logits"])


@dataclasses.dataclass
class LogitsObject:
    logits: torch.Tensor
    loss: Any = None


def test_read_output_finds_logits_aux_heads_and_the_models_loss():
    t, a, loss = torch.randn(2, 3), torch.randn(2, 3), torch.tensor(1.5)
    assert read_output(t).logits is t
    read = read_output({"logits": t, "loss": loss, "hidden_states": None})
    assert read.logits is t and read.loss is loss and read.aux == []
    read = read_output({"out": t, "aux": a})
    assert read.logits is t and read.aux == [a]
    read = read_output(Outputs(t, a))
    assert read.logits is t and read.aux == [a]
    read = read_output(Outputs(t, None))  # torchvision with aux_logits off
    assert read.logits is t and read.aux == []
    read = read_output((t, a))  # a plain tuple: the first element is the logits, the rest unknown
    assert read.logits is t and read.aux == []
    read = read_output(LogitsObject(t, loss))
    assert read.logits is t and read.loss is loss


@pytest.mark.parametrize("output,named", [
    ([torch.randn(2)], "list"), ({"scores": torch.randn(2)}, "dict (keys scores)"),
    (foreign_outputs.Scores(torch.randn(2)), "foreign_outputs.Scores"), ((), "tuple"), (None, "NoneType")])
def test_an_unreadable_output_names_its_type_and_the_two_ways_out(output, named):
    with pytest.raises(ConfigError) as caught:
        read_output(output)
    message = str(caught.value)
    assert "\n" not in message and f"forward returned a {named}" in message
    assert "set train.loss: 'package.module:function'" in message and "make forward return the logits" in message


def test_pass_labels_gives_a_causal_lm_its_input_tokens_and_a_classifier_its_targets():
    seen = {}

    class Echo(nn.Module):
        def forward(self, x, labels=None):
            seen["labels"] = labels
            return {"logits": x.float(), "loss": x.float().sum()}

    x, y = torch.arange(6).reshape(2, 3), torch.tensor([1, 0])
    assert StepLoss("lm", pass_labels=True)(Echo(), x, y) == 15.0
    assert seen["labels"] is x
    StepLoss("classify", pass_labels=True)(Echo(), x, y)
    assert seen["labels"] is y


def test_a_user_loss_that_is_not_a_scalar_and_a_forward_without_labels_are_one_line():
    x, y = torch.randn(4, 12), torch.randint(0, 4, (4,))
    wrong = StepLoss("classify", user_loss=foreign_outputs.per_sample_loss, user_loss_spec="m:per_sample")
    with pytest.raises(ConfigError, match=r"^train.loss: 'm:per_sample' returned a tensor of shape \[4\]; "
                                          "expected a scalar tensor"):
        wrong(foreign_outputs.scores_net(), x, y)
    with pytest.raises(ConfigError, match="^model.pass_labels: ScoresNet.forward takes no 'labels' argument"):
        StepLoss("classify", pass_labels=True)(foreign_outputs.scores_net(), x, y)


def test_the_planner_workload_uses_the_step_loss(tmp_path):
    from lmsdp.launcher.train.job_plan import workload_from_config

    path = tmp_path / "job.yaml"
    path.write_text("model: {factory: foreign_outputs:scores_net}\ntrain: {loss: 'foreign_outputs:scores_loss'}\n"
                    "data: {task: classify, shape: [12], classes: 4}\n")
    workload = workload_from_config(load_config(str(path)))
    model = workload.build_model()
    inputs, targets = workload.make_batch(2)
    assert workload.step_loss(model, inputs, targets).shape == ()


@pytest.mark.parametrize("overrides,words", [
    (["model.config_factory=foreign_outputs:Scores"], ["model.config_factory: needs model.factory"]),
    (["model.name=gpt", "model.pass_labels=true"], ["model.pass_labels: zoo model 'gpt'", "allowed: false"]),
    (["model.factory=foreign_outputs:scores_net", "train.loss=foreign_outputs:one_argument"],
     ["train.loss: 'foreign_outputs:one_argument' cannot be called as f(output, target)"]),
    (["model.factory=foreign_outputs:scores_net", "train.loss=foreign_outputs:no_such_loss"],
     ["train.loss: module 'foreign_outputs' has no attribute 'no_such_loss'"]),
    (["model.factory=foreign_outputs:scores_net", "model.config_factory=foreign_outputs:Scores",
      "model.kwargs={value: 1}"], ["model.kwargs.value: model.config_factory 'foreign_outputs:Scores' takes no "
                                    "argument 'value' (did you mean 'values'?)"]),
    (["train.aux_weight=-1"], ["train.aux_weight"]),
    (["data.vocab=0"], ["data.vocab"]),
])
def test_bad_keys_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    for word in words:
        assert word in str(caught.value), str(caught.value)


@needs_transformers
def test_a_hugging_face_class_method_factory_builds_from_its_config_without_downloading():
    from lmsdp.launcher.train.build import build_network

    config = load_config(None, ["model.factory=transformers:AutoModelForCausalLM.from_config",
                                "model.config_factory=transformers:GPT2Config", f"model.kwargs={_yaml(GPT2)}"])
    model = build_network(config)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2


@needs_transformers
def test_hugging_face_gpt2_recomputes_its_dropouts_bit_exactly():
    """swap.recompute (and the planner's recompute variants) wraps modules Hugging Face reads attributes
    of (GPT-2's ``self.attn_dropout.p``): the wrapper answers for them, and the step is unchanged."""
    from lmsdp.swapping.recompute import apply_recompute

    config = {**GPT2, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = _hf("GPT2LMHeadModel")(_hf("GPT2Config")(**config))
        if recompute:
            assert apply_recompute(model, ["dropout"]) > 0
            assert model.transformer.h[0].attn.attn_dropout.p == 0.1
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        model(x, labels=x).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
