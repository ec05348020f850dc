"""Protects the training loop end to end on tiny offline models: each arm runs and writes the
files of the command-line contract (eval.jsonl from the `eval.py RUN` that `selfdistill.py` runs
after training); only LoRA weights train and the base weights stay bit-identical; the base teacher
is exactly the pristine model, and each of teacher_weights' teachers (base, ema, live) is the model
it says; a killed run resumes to the same adapter and metrics as an uninterrupted one; gradient
checkpointing changes neither the loss nor the gradient; explain.py shows the trainer's step.
The sampler's own tests are in test_sampler.py."""
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import chunked_head
from plumbing import common
import contexts
import ema_teacher
import selfdistill
from plumbing.common import UserError
from conftest import run_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


overrides = functools.partial(run_settings, max_new_tokens=12, lr=0.05)


def run_cli(args, **kwargs):
    return subprocess.run([sys.executable, "selfdistill.py", *args], cwd=ROOT, capture_output=True,
                          text=True, **kwargs)


@pytest.mark.parametrize("context", selfdistill.ARMS)
def test_each_context_runs_two_steps_and_writes_the_contract(context, tiny_model_dir, data, tmp_path):
    result = run_cli(["--context", context, "--config", "configs/smoke.yaml", "--run", "smoke",
                      *overrides(tiny_model_dir, data, tmp_path, batch_size=2, micro_batch=4,
                                eval_at_end=True)])
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "smoke"
    assert (run / "config.yaml").is_file()
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(k in metrics[0] for k in ("train/loss", "train/reward",
                                         "train/critique_invalid", "train/zero_signal", "time/generate"))
    for m in metrics:  # entropy (and kl) are absent, not 0, when no token entered the loss
        assert ("train/entropy" in m) == (m["train/zero_signal"] < 1)
        assert ("train/kl" in m) == (context != "grpo" and m["train/zero_signal"] < 1)
    assert "\r" not in result.stdout + result.stderr  # piped: plain lines, no progress-bar frames
    samples = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all("context" in s and "response" in s for s in samples)
    if context != "grpo":
        assert all(s["context"] for s in samples)
    for step in (1, 2):
        ckpt = run / "checkpoints" / f"step_{step:06d}"
        assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "trainer_state.pt").is_file()
    assert "step 2/2" in result.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["arm"] == context
    evaluated = [json.loads(l) for l in (run / "eval.jsonl").read_text().splitlines()]
    assert sorted(e["step"] for e in evaluated) == [0, 1, 2]


def train_in_process(model_dir, data, out_dir, context="reference", **extra):
    cfg = selfdistill.load_config(["--context", context, "--run", "r",
                                   *overrides(model_dir, data, out_dir, **extra)])
    return selfdistill.train(cfg)


def test_lora_trains_base_stays_bit_identical_and_base_teacher_is_pristine(tiny_model_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM
    pristine = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    run_dir, model = train_in_process(tiny_model_dir, data, tmp_path, max_steps=3)
    base_state = pristine.state_dict()
    lora_changed = 0
    for name, param in model.named_parameters():
        if "lora_B" in name:
            lora_changed += int(param.abs().sum() > 0)  # B starts at zero
        elif "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, base_state[key]), name
            assert not param.requires_grad
    assert lora_changed > 0
    ids = torch.tensor([[5, 9, 14, 30, 31, 7]])
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, pristine(input_ids=ids).logits)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, pristine(input_ids=ids).logits)


def test_saved_adapter_loads_with_peft(tiny_model_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    run_dir, model = train_in_process(tiny_model_dir, data, tmp_path, max_steps=2)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       os.path.join(run_dir, "checkpoints", "step_000002")).eval()
    ids = torch.tensor([[5, 9, 14, 30]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_ema_teacher_state_is_checkpointed(tiny_model_dir, data, tmp_path):
    run_dir, model = train_in_process(tiny_model_dir, data, tmp_path, max_steps=2, teacher="ema",
                                      ema_rate=0.5)
    state = torch.load(os.path.join(run_dir, "checkpoints", "step_000002", "trainer_state.pt"),
                       weights_only=True)
    assert state["ema"] and all(torch.isfinite(v).all() for v in state["ema"].values())
    # after two updates at rate 1/2 from zero: ema = 0.25·ΔW_1 + 0.5·ΔW_2, non-zero and not ΔW_2
    name, module = ema_teacher.lora_modules(model)[0]
    delta = module.get_delta_weight("default").float()
    assert state["ema"][name].abs().sum() > 0 and not torch.allclose(state["ema"][name], delta)


def adapter_hash(run_dir, step):
    path = os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "adapter_model.safetensors")
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def metrics_without_times(run_dir):
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_killed_run_resumes_to_the_same_weights_and_metrics(tiny_model_dir, data, tmp_path):
    args = ["--context", "critique", "--run", "r",
            *overrides(tiny_model_dir, data, tmp_path / "a", max_steps=6, checkpoint_every=2)]
    assert run_cli(args).returncode == 0
    reference = tmp_path / "a" / "r"
    args_b = args[:4] + overrides(tiny_model_dir, data, tmp_path / "b", max_steps=6, checkpoint_every=2)
    run_b = tmp_path / "b" / "r"
    process = subprocess.Popen([sys.executable, "selfdistill.py", *args_b], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run_b / "checkpoints" / "step_000002"
    deadline = time.time() + 120
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_b / "checkpoints" / "step_000006").exists(), "killed too late to test resuming"
    assert run_cli(args_b).returncode == 0
    assert adapter_hash(run_b, 6) == adapter_hash(reference, 6)
    assert metrics_without_times(run_b) == metrics_without_times(reference)


@pytest.mark.parametrize("problem,fragment", [
    ("missing", "not found"),
    ("malformed", ":2: not valid JSON"),
    ("empty", "has no records"),
    ("no_answer", ":1: each line needs"),
])
def test_bad_dataset_files_are_one_line_errors(problem, fragment, tmp_path, tiny_model_dir):
    path = tmp_path / "d.jsonl"
    content = {"missing": None, "malformed": '{"question": "1+1", "answer": 2}\n{oops\n',
               "empty": "\n", "no_answer": '{"question": "1+1"}\n'}[problem]
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as e:
        common.load_jsonl(str(path))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_reference_context_needs_solutions(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "1+1", "answer": 2}\n')
    with pytest.raises(UserError, match="needs a 'solution'"):
        common.load_jsonl(str(path), need_solution=True)


def test_model_without_chat_template_and_unknown_folder(no_template_model_dir, data, tmp_path):
    result = run_cli(["--context", "grpo", *overrides(no_template_model_dir, data, tmp_path)])
    assert result.returncode == 2 and "no chat template" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="cannot load"):
        common.load_tokenizer(str(tmp_path / "no_such_model"))


def test_unreachable_critic_url_is_a_one_line_error(tiny_model_dir, data, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli(["--context", "critique", *overrides(tiny_model_dir, data, tmp_path, critic="http",
                                                          critic_url=f"http://127.0.0.1:{port}/v1",
                                                          critic_model="m")])
    assert result.returncode == 2 and "unreachable" in result.stderr
    assert result.stderr.strip().splitlines() == [l for l in result.stderr.splitlines() if "unreachable" in l]


def distill_backward(model, cfg, items, pad_id, device, ema=None):
    """The loop's steps 3-5 on given (student prompt ids, teacher prompt ids, response ids): per
    micro-batch the teacher's hidden states (no grad, eval mode, teacher_weights), the student's
    (with grad), sd_loss over every response token, backward. Returns the summed loss."""
    weight = model.get_base_model().get_output_embeddings().weight  # (V, d)
    total = 0.0
    for start in range(0, len(items), cfg.micro_batch):
        part = items[start:start + cfg.micro_batch]
        rows, teacher_rows = contexts.build_pair([p[0] for p in part], [p[1] for p in part],
                                                 [p[2] for p in part], pad_id)
        mask = rows["response_mask"].to(device)  # (B, T)
        sampled_ids = rows["input_ids"][:, -mask.shape[1]:].to(device)[mask]  # (N,)
        with torch.no_grad(), common.eval_mode(model), selfdistill.teacher_weights(model, cfg.teacher, ema or {}):
            teacher_h = chunked_head.response_hidden(model, teacher_rows, mask.shape[1], device)[mask]
        student_h = chunked_head.response_hidden(model, rows, mask.shape[1], device)[mask]
        loss, _ = selfdistill.sd_loss(student_h, teacher_h, weight, sampled_ids, mask, mask, len(items), cfg)
        loss.backward()
        total += loss.item()
    return total


def random_adapter(model, seed=1):
    """A nonzero adapter, so the student differs from the base teacher."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)


def test_gradient_checkpointing_gives_the_same_loss_and_gradient(tiny_model_dir, monkeypatch):
    """Recomputing activations in the backward must not change the step (it only saves memory)."""
    items = [([5, 9, 14], [5, 20, 21, 22, 9, 14], [30, 31, 7, 8]), ([6, 9], [6, 40, 41, 9], [33, 7])]
    results = []
    for checkpointing in (False, True):
        cfg = selfdistill.load_config([f"gradient_checkpointing={checkpointing}", "lora_r=4", "micro_batch=1"])
        model, tok = common.load_model(cfg, tiny_model_dir, torch.device("cpu"))
        random_adapter(model)
        model.train()
        # count the MLP runs of one layer (a module hook would miss the recomputation)
        mlp = model.get_base_model().get_decoder().layers[0].mlp
        calls, forward = [], type(mlp).forward
        monkeypatch.setattr(type(mlp), "forward", lambda self, x: calls.append(self is mlp) or forward(self, x))
        loss = distill_backward(model, cfg, items, tok.pad_token_id, torch.device("cpu"))
        monkeypatch.undo()
        # per micro-batch: teacher (no grad) and student forwards, plus the recomputation if on
        assert calls.count(True) == len(items) * (3 if checkpointing else 2)
        assert model.training  # eval_mode restored the student's mode
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, grads))
    (loss_plain, grads_plain), (loss_checkpointed, grads_checkpointed) = results
    assert loss_plain > 0 and loss_checkpointed == pytest.approx(loss_plain, rel=1e-6)
    assert grads_plain.keys() == grads_checkpointed.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_checkpointed[name], grads_plain[name], rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads_plain.values())


@torch.no_grad()
def test_teacher_weights_are_the_models_they_name(tiny_model_dir):
    """base: the pristine model (adapter off); live: the student as it is; ema: the base plus x·ΔW_Tᵀ
    in each adapted layer, so an EMA holding exactly the current ΔW is the student, an empty one the
    base, and half of it lies between. The hooks are gone after the block."""
    from transformers import AutoModelForCausalLM
    pristine = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    cfg = selfdistill.load_config(["lora_r=4"])
    model, _ = common.load_model(cfg, tiny_model_dir, torch.device("cpu"))
    random_adapter(model)
    model.eval()
    ids = torch.tensor([[5, 9, 14, 30, 31, 7]])
    base, student = pristine(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(base, student)
    with selfdistill.teacher_weights(model, "base", {}):
        assert torch.equal(model(input_ids=ids).logits, base)
    with selfdistill.teacher_weights(model, "live", {}):
        assert torch.equal(model(input_ids=ids).logits, student)
    ema = {}
    ema_teacher.ema_update(ema, model, rate=1.0)  # ΔW_T = ΔW_θ
    assert len(ema) == len(ema_teacher.lora_modules(model)) > 0
    with selfdistill.teacher_weights(model, "ema", ema):
        torch.testing.assert_close(model(input_ids=ids).logits, student, rtol=1e-5, atol=1e-5)
    with selfdistill.teacher_weights(model, "ema", {}):
        assert torch.equal(model(input_ids=ids).logits, base)
    half = {name: delta / 2 for name, delta in ema.items()}
    with selfdistill.teacher_weights(model, "ema", half):
        between = model(input_ids=ids).logits
    assert not torch.allclose(between, base) and not torch.allclose(between, student)
    assert torch.equal(model(input_ids=ids).logits, student)  # adapter back on, no hook left


@pytest.mark.parametrize("field, value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.0625)])
def test_a_transformed_lm_head_is_refused_by_its_config(field, value, tmp_path):
    """Soft-capping at 30 is nearly the identity on random weights; the config must decide."""
    from conftest import save_tiny
    folder = save_tiny(tmp_path / "capped")
    config = json.loads((tmp_path / "capped" / "config.json").read_text())
    (tmp_path / "capped" / "config.json").write_text(json.dumps({**config, field: value}))
    cfg = selfdistill.resolve(selfdistill.Config(model=folder, prompts="instruct"))
    with pytest.raises(common.UserError, match=f"its config sets {field}"):
        common.load_model(cfg, folder, torch.device("cpu"))


def test_a_checkpoint_loads_with_auto_peft_from_any_folder(tiny_model_dir, data, tmp_path):
    """adapter_config.json names the base by absolute path and the tokenizer sits beside the adapter,
    so AutoPeftModelForCausalLM.from_pretrained(checkpoint) works from another working directory."""
    out = tmp_path / "runs"
    relative = os.path.relpath(tiny_model_dir, ROOT)  # the base given as a relative path
    result = run_cli(["--context", "critique", "--run", "r",
                      *overrides(relative, data, out, max_steps=1, batch_size=2, micro_batch=2)])
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = out / "r" / "checkpoints" / "step_000001"
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == os.path.abspath(tiny_model_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import sys, torch; from peft import AutoPeftModelForCausalLM; from transformers import AutoTokenizer;"
             "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]);"
             "ids = t('1+1', return_tensors='pt').input_ids; print(m(input_ids=ids).logits.shape[-1] == len(t))")
    loaded = subprocess.run([sys.executable, "-c", probe, str(checkpoint)], cwd=elsewhere, capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert loaded.returncode == 0 and loaded.stdout.strip() == "True", loaded.stderr[-2000:]


@pytest.mark.parametrize("context", ["critique", "grpo"])
def test_explain_shows_the_first_step_and_its_loss_and_writes_nothing(context, tiny_model_dir, data, tmp_path,
                                                                      capsys):
    """explain.py --explain N prints N rollouts of step 1 (A_t marks when piped; grpo: rewards and advantages)
    and the step's loss, which is the loss the trainer's step 1 reports on the same seed; no run
    folder appears."""
    from conftest import run_main
    import explain
    extra = {"grpo_beta": 0.1} if context == "grpo" else {}  # β > 0 keeps every rollout (the tiny model scores 0)
    args = ["--context", context, *overrides(tiny_model_dir, data, tmp_path / "explain", max_steps=1, **extra)]
    code, _, err = run_main([*args, "--explain", "1"], capsys)  # selfdistill.py names the program
    assert code == 2 and err.strip() == f"error: --explain is its own program: python explain.py {' '.join(args)} --explain 1"
    code, out, err = run_main([*args, "--explain", "1"], capsys, explain)
    assert code in (0, None), err
    assert not (tmp_path / "explain").exists()
    assert out.count("=== rollout ") == 1 and "--- question" in out
    if context == "grpo":
        assert "advantages A = (r − mean r)" in out
    else:
        assert "the critic's critique" in out and "as the teacher sees it" in out
        assert "[+" in out or "[-" in out  # piped: each token's A_t after it
    shown_loss = float(out.split("=== step 1 loss ")[1].split()[0])
    train_in_process(tiny_model_dir, data, tmp_path / "train", context=context, max_steps=1, **extra)
    trained = json.loads((tmp_path / "train" / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert shown_loss == pytest.approx(trained["train/loss"], rel=1e-4, abs=1e-6)
    assert "train/kl" in trained  # grpo with β > 0: the k3 KL to the base (0 at step 1: θ = base)
