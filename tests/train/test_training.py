"""Both training stages on CPU with tiny models: data → stage 1 → stage 2 → adapter → generate; exact resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from instruct_core.adapter_io import read_adapter_metadata
from instruct_core.train.checkpointing import list_checkpoints, load_checkpoint, save_checkpoint
from instruct_core.cli import main
from instruct_core.pipeline import InstructImagen
from instruct_core.train.retrieval import load_clusters
from instruct_core.train.stages import run_training
from instruct_core.train.data import TrainingExample
from instruct_core.instruction import MultiModalInstruction
from instruct_core.tiny import build_tiny_base, tiny_tokenizer
from instruct_core.train.trainer import StepBatches, add_filler_words, filler_words
from instruct_core.train.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"red": (210, 40, 40), "blue": (40, 60, 210), "green": (40, 170, 60), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def _draw(shape, colour, offset, size=32):
    image = Image.new("RGB", (size, size), (235, 235, 230))
    box = (6 + offset, 8, 22 + offset, 24)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """8 groups (shape × colour) of 6 shifted variants, captions in sidecar files, plus bad items."""
    folder = tmp_path_factory.mktemp("data")
    for shape in SHAPES:
        for colour in COLOURS:
            for offset in range(6):
                stem = folder / f"{shape}_{colour}_{offset}"
                _draw(shape, colour, offset).save(f"{stem}.png")
                stem.with_suffix(".txt").write_text(f"a {colour} {shape}")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "corrupt.txt").write_text("broken")
    _draw("square", "red", 0).save(folder / "no_caption.png")
    (folder / "orphan.txt").write_text("a caption without image")
    return folder


def _config(tmp_path, stage, source, **train):
    settings = {"steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "seed": 0}
    settings.update(train)
    return config_from_dict({
        "stage": stage, "base_model": "tiny", "output_dir": str(tmp_path / f"stage{stage}"),
        "data": {"source": str(source), "resolution": 32, "embedder": "pixel",
                 "mix": "text_to_image=0.3,edge_to_image=0.3,mask_to_image=0.2,inpainting=0.2"},
        "train": settings, "checkpoint": {"every": 2, "keep": 2},
    })


def _fresh_pipe(seed=0):
    return InstructImagen.from_base(build_tiny_base(seed=seed))


def test_stage1_then_stage2_then_generate(dataset, tmp_path):
    stage1 = run_training(_config(tmp_path, 1, dataset), pipe=_fresh_pipe())
    report = json.loads((tmp_path / "stage1" / "train_report.json").read_text())
    assert report["data"]["kept"] == 48
    assert report["data"]["skipped"].get("unreadable_image") == 1
    assert report["data"]["skipped"].get("missing_caption") == 1
    clusters = load_clusters(tmp_path / "stage1" / "clusters.json")
    assert len(clusters) > 0 and all(len(c.members) == 5 for c in clusters)
    assert stage1.step == 6 and read_adapter_metadata(stage1.adapter_path)["stage"] == "1"

    config2 = _config(tmp_path, 2, dataset)
    config2.adapter = str(stage1.adapter_path)
    from instruct_core.models import load_pipeline
    from instruct_core.train.stages import adapter_config_of

    pipe2 = load_pipeline("tiny", config2.adapter, device="cpu", adapter_config=adapter_config_of(config2))
    stage2 = run_training(config2, pipe=pipe2)
    assert stage2.step == 6 and (tmp_path / "stage2" / "loss_curve.png").is_file()
    assert read_adapter_metadata(stage2.adapter_path)["stage"] == "2"

    out = tmp_path / "generated.png"
    code = main(["generate", "--instruction", str(REPO / "examples" / "two_contexts" / "instruction.json"),
                 "--model", "tiny", "--adapter", str(stage2.adapter_path), "--out", str(out), "--steps", "3",
                 "--quiet"])
    assert code == 0 and Image.open(out).size == (32, 32)


def test_stage1_clusters_group_similar_images(dataset, tmp_path):
    config = _config(tmp_path, 1, dataset, steps=1)
    run_training(config, pipe=_fresh_pipe())
    clusters = load_clusters(tmp_path / "stage1" / "clusters.json")
    data = json.loads((tmp_path / "stage1" / "clusters.json").read_text())
    keys = data.get("keys") or data.get("items")
    assert keys, "clusters.json must name its items"
    same_group = 0
    for cluster in clusters:
        # The pixel embedder sees colour before shape at this size: neighbours share their colour.
        colours = {Path(keys[m]).stem.split("_")[1] for m in cluster.members}
        same_group += len(colours) == 1
    assert same_group / len(clusters) > 0.9


def test_resume_after_a_crash_reproduces_the_uninterrupted_curve(dataset, tmp_path):
    full = run_training(_config(tmp_path / "a", 2, dataset, steps=8), pipe=_fresh_pipe())

    config = _config(tmp_path / "b", 2, dataset, steps=8)
    stopped = run_training(config, pipe=_fresh_pipe(), cancel=_cancel_after(5))
    assert stopped.cancelled and stopped.step == 5
    resumed = run_training(config, pipe=_fresh_pipe(), resume=True)
    assert resumed.step == 8
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)
    # The training time of a resumed run counts the steps before the crash too.
    assert resumed.report["train_seconds"] > resumed.report["seconds"] > 0
    assert stopped.report["train_seconds"] == pytest.approx(stopped.report["seconds"], abs=0.5)
    final_a = load_checkpoint(list_checkpoints(tmp_path / "a" / "stage2" / "checkpoints")[-1])[1]
    final_b = load_checkpoint(list_checkpoints(tmp_path / "b" / "stage2" / "checkpoints")[-1])[1]
    for name, value in final_a["trainable"].items():
        assert torch.allclose(value, final_b["trainable"][name], atol=1e-6), name


def _cancel_after(steps):
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] >= steps

    return cancel


def _fixed_loss(pipe, dataset_examples):
    from instruct_core.train.trainer import DiffusionLoss, example_to_tensors

    loss_module = DiffusionLoss(pipe).eval()
    tensors = [example_to_tensors(e, 32) for e in dataset_examples]
    total = 0.0
    with torch.no_grad():
        for seed in range(4):
            for t in tensors:
                x0 = pipe.to_model_space(t.target[None])
                text, _ = pipe.encode_text([t.text])
                images = pipe.to_model_space(torch.stack(t.context_images)) if t.context_images else None
                ctx_text = pipe.encode_text(t.context_texts)[0] if t.context_images else None
                layout = [list(range(len(t.context_images)))]
                total += float(loss_module(x0, text, images, ctx_text, t.modalities, layout,
                                           torch.tensor(t.weights) if t.weights else None, None,
                                           generator_seed=seed))
    return total


def test_training_lowers_the_loss_and_changes_the_output(dataset, tmp_path):
    from instruct_core.train.instruction_tasks import TaskMixture, parse_mix
    from instruct_core.train.data import read_dataset

    items = read_dataset(dataset)
    mixture = TaskMixture(parse_mix("edge_to_image=0.5,inpainting=0.5"), items, seed=1, phrasings="train")
    held = [mixture[i] for i in range(4)]
    pipe = _fresh_pipe()
    before = _fixed_loss(pipe, held)
    untrained = pipe.generate(held[0].instruction, seed=0, steps=4, width=32, height=32).images
    config = _config(tmp_path, 2, dataset, steps=40, batch_size=4, lr=2e-3,
                     p_drop_all=0.0, p_drop_context=0.0)
    config.data.mix = "edge_to_image=0.5,inpainting=0.5"
    run_training(config, pipe=pipe)
    pipe.model.eval()
    after = _fixed_loss(pipe, held)
    trained = pipe.generate(held[0].instruction, seed=0, steps=4, width=32, height=32).images
    assert after < 0.9 * before
    assert (trained - untrained).abs().max() > 1e-2


@pytest.mark.parametrize("train", [
    dict(grad_accum=2, ema_decay=0.9),
    dict(optimizer="adafactor"),
    dict(train_base="lora", lora_rank=2),
    dict(train_base="full"),
    dict(mixed_precision="bf16", gradient_checkpointing=True),
    dict(p_filler_words=1.0, max_filler_words=3),
])
def test_training_options(dataset, tmp_path, train):
    config = _config(tmp_path, 2, dataset, steps=2, **train)
    result = run_training(config, pipe=_fresh_pipe())
    assert result.step == 2 and all(map(lambda x: x == x, result.losses))
    if train.get("train_base") == "lora":
        from instruct_core.adapter_io import load_adapter

        meta = read_adapter_metadata(result.adapter_path)
        assert json.loads(meta["base_lora"])["rank"] == 2
        fresh = build_tiny_base(seed=0)
        loaded = load_adapter(result.adapter_path, fresh.unet)
        lora = {n: p for n, p in loaded.unet.named_parameters() if ".lora_" in n}
        assert lora and any(p.abs().sum() > 0 for n, p in lora.items() if ".lora_B." in n)
    if train.get("train_base") == "full":
        assert (tmp_path / "stage2" / "base_unet.safetensors").is_file()


def test_lr_factor_warms_up_then_decays_to_zero_after_the_last_step():
    from instruct_core.train.trainer import lr_factor

    assert [lr_factor(2, 6, "constant", s) for s in range(6)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(2, 6, "linear", s) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cosine = [lr_factor(0, 8, "cosine", s) for s in range(8)]
    assert cosine[0] == 1.0 and all(a > b > 0 for a, b in zip(cosine, cosine[1:]))
    assert cosine[4] == pytest.approx(0.5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_decaying_schedule_sets_each_steps_rate_and_survives_a_resume(dataset, tmp_path, schedule):
    from instruct_core.train.stages import build_stage2_data
    from instruct_core.train.trainer import Trainer, lr_factor

    config = _config(tmp_path, 2, dataset, steps=4, lr=1e-3, lr_schedule=schedule)
    rates = []

    def run(steps, resume):
        config.train.steps = 4  # the schedule spans the whole run, however it is split
        trainer = Trainer(config, _fresh_pipe(), build_stage2_data(config, {}),
                          progress=lambda step, total, loss: rates.append(trainer.optimizer.param_groups[0]["lr"]),
                          cancel=lambda: len(rates) >= steps)
        trainer.run(resume=resume)

    run(2, resume=False)  # cancelled after 2 steps, checkpoint written
    run(4, resume=True)
    # the rate reported after step k is the one step k + 1 uses
    expected = [1e-3 * lr_factor(0, 4, schedule, step) for step in range(1, 5)]
    assert rates == pytest.approx(expected)
    assert rates[-1] == 0.0 and rates[0] < 1e-3


def test_a_decaying_schedule_is_not_resumed_over_another_length(dataset, tmp_path):
    from instruct_core.train.trainer import TrainingError

    config = _config(tmp_path, 2, dataset, steps=2, lr_schedule="linear")
    run_training(config, pipe=_fresh_pipe())
    config.train.steps = 4
    with pytest.raises(TrainingError, match=r"linear over 2 steps after 0 warmup steps, this run's linear over 4"):
        run_training(config, pipe=_fresh_pipe(), resume=True)
    config.train.lr_schedule, config.train.steps = "constant", 2
    with pytest.raises(TrainingError, match="this run's constant after 0 warmup"):
        run_training(config, pipe=_fresh_pipe(), resume=True)


def test_validation_samples_are_written(dataset, tmp_path):
    config = _config(tmp_path, 2, dataset, steps=4)
    config.validation.every = 2
    config.validation.steps = 2
    run_training(config, pipe=_fresh_pipe())
    samples = sorted(p.name for p in (tmp_path / "stage2" / "samples").glob("*.png"))
    assert samples == ["step_000002.png", "step_000004.png"]


def test_config_errors_name_the_key(tmp_path):
    cases = [({"train": {"steps": 0}}, "train.steps"), ({"train": {"lr": "fast"}}, "train.lr"),
             ({"trian": {}}, "trian"), ({"data": {"resolutoin": 32}}, "data.resolutoin"),
             ({"stage": 3}, "stage"), ({"data": {"source": None}}, "data.source"),
             ({"train": {"optimizer": "sgd"}}, "train.optimizer"),
             ({"train": {"lr_schedule": "exponential"}}, "train.lr_schedule"),
             ({"train": {"p_filler_words": 1.5}}, "train.p_filler_words"),
             ({"train": {"max_filler_words": 0}}, "train.max_filler_words")]
    for values, key in cases:
        document = {"data": {"source": "x"}}
        for k, v in values.items():
            document.setdefault(k, {})
            if isinstance(v, dict) and isinstance(document[k], dict):
                document[k].update(v)
            else:
                document[k] = v
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict(document)
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: x}\ntrain: {steps: 3}\n")
    assert load_config(path, ["train.steps=7", "train.lr=0.01"]).train.steps == 7


def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as text; a learning rate written that way must still work."""
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: x}\ntrain: {lr: 1e-4, warmup_steps: 1E2}\n")
    config = load_config(path, ["train.ema_decay=5e-1"])
    assert (config.train.lr, config.train.warmup_steps, config.train.ema_decay) == (1e-4, 100, 0.5)
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(path, ["train.lr=1e-4x"])


def test_cli_train_reports_config_errors_with_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"stage": 2, "data": {"source": str(tmp_path / "missing")}}))
    assert main(["train", "--config", str(path), "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--quiet"]) == 2


def test_kill_9_loses_at_most_one_checkpoint_interval(dataset, tmp_path):
    config = {"stage": 2, "base_model": "tiny", "output_dir": str(tmp_path / "run"),
              "data": {"source": str(dataset), "resolution": 32, "mix": "text_to_image=1"},
              "train": {"steps": 400, "batch_size": 1, "warmup_steps": 0}, "checkpoint": {"every": 2, "keep": 2}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "instruct_core", "train", "--config", str(path), "--quiet"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 900  # a loaded machine starts slowly; the loop ends as soon as 2 exist
    while time.time() < deadline and len(list_checkpoints(checkpoints)) < 2:
        assert proc.poll() is None, f"training ended before the kill: {proc.communicate()[1].decode()[-2000:]}"
        time.sleep(0.2)
    time.sleep(0.3)  # land somewhere between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = list_checkpoints(checkpoints)
    assert saved, "no checkpoint was written before the kill"
    last_step, state = load_checkpoint(saved[-1])  # complete and readable
    assert len(state["losses"]) == last_step
    overrides = ["--set", f"train.steps={last_step + 2}"]
    code = main(["train", "--config", str(path), "--resume", "--quiet", *overrides])
    assert code == 0
    final_step, final_state = load_checkpoint(list_checkpoints(checkpoints)[-1])
    assert final_step == last_step + 2
    assert final_state["losses"][:last_step] == state["losses"]


def test_listing_checkpoints_never_touches_a_save_in_progress(tmp_path):
    """A monitor may list the folder while the trainer writes; only the writer clears a killed save's leftovers."""
    folder = tmp_path / "checkpoints"
    good = save_checkpoint(folder, 1, {"w": torch.ones(2)})
    in_progress = folder / "step_000000002.tmp"
    in_progress.mkdir()
    (in_progress / "tensors.safetensors").write_bytes(b"half")
    assert list_checkpoints(folder) == [good]
    assert in_progress.is_dir()
    save_checkpoint(folder, 3, {"w": torch.zeros(2)})  # the writer's next save clears what a kill left
    assert not in_progress.exists()
    assert [p.name for p in list_checkpoints(folder)] == ["step_000000001", "step_000000003"]


def test_two_processes_train_with_data_parallel(dataset, tmp_path):
    """The multi-GPU code path (accelerate + DDP) on two CPU processes with gloo, launched by torchrun."""
    config = {"stage": 2, "base_model": "tiny", "output_dir": str(tmp_path / "ddp"),
              "data": {"source": str(dataset), "resolution": 32, "mix": "text_to_image=0.5,edge_to_image=0.5"},
              "train": {"steps": 3, "batch_size": 1, "warmup_steps": 0}, "checkpoint": {"every": 3}}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "instruct_core", "train", "--config", str(path), "--quiet"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done at step 3") == 2  # both ranks finished the same number of steps
    report = json.loads((tmp_path / "ddp" / "train_report.json").read_text())
    assert report["steps"] == 3


def test_held_out_loss_is_repeatable_and_sees_the_weights(dataset, tmp_path):
    from instruct_core.train.data import read_dataset
    from instruct_core.train.instruction_tasks import TaskMixture, parse_mix
    from instruct_core.train.trainer import Trainer

    mixture = TaskMixture(parse_mix("edge_to_image=1"), read_dataset(dataset), seed=1, phrasings="train")
    examples = [mixture[i] for i in range(6)]
    pipe = _fresh_pipe()
    trainer = Trainer(_config(tmp_path, 2, dataset), pipe, mixture)
    pipe.model.train()
    first = trainer.held_out_loss(examples, batch_size=4)
    assert pipe.model.training  # the mode it found
    assert trainer.held_out_loss(examples, batch_size=4) == first  # fixed noise and timesteps
    with torch.no_grad():
        for name, parameter in pipe.model.adapter.named_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # the zero-init output layers now act
    assert trainer.held_out_loss(examples, batch_size=4) != first


def test_the_text_encoder_trains_on_request_and_resumes(dataset, tmp_path):
    from safetensors.torch import load_file

    from instruct_core.train.trainer import TrainingError

    def encoder_weights(pipe):
        return {k: v.clone() for k, v in pipe.base.text_encoders[0].state_dict().items()}

    frozen = _fresh_pipe()
    before = encoder_weights(frozen)
    run_training(_config(tmp_path / "frozen", 2, dataset, steps=2, train_base="full"), pipe=frozen)
    assert all(torch.equal(before[k], v) for k, v in encoder_weights(frozen).items())

    config = _config(tmp_path / "trained", 2, dataset, steps=2, train_base="full", train_text_encoder=True)
    trained = _fresh_pipe()
    run_training(config, pipe=trained)
    after = encoder_weights(trained)
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert "embeddings.token_embedding.weight" in changed
    assert any(k.startswith("encoder.layers.") for k in changed)  # the layers, not only the looked-up embeddings
    exported = load_file(tmp_path / "trained" / "stage2" / "base_text_encoders.safetensors")
    assert torch.equal(exported["text_encoder.embeddings.token_embedding.weight"],
                       after["embeddings.token_embedding.weight"])

    # a resume restores the encoder (the run is finished: nothing trains after it), and one that would drop
    # its training is refused
    resumed = _fresh_pipe()
    run_training(config, pipe=resumed, resume=True)
    assert all(torch.equal(after[k], v) for k, v in encoder_weights(resumed).items())
    config.train.train_text_encoder = False
    with pytest.raises(TrainingError, match="checkpoint trains text_encoder.*train_text_encoder"):
        run_training(config, pipe=_fresh_pipe(), resume=True)


def test_training_the_text_encoder_needs_the_full_base(tmp_path):
    with pytest.raises(ConfigError, match="train.train_text_encoder.*train_base: full"):
        config_from_dict({"stage": 2, "base_model": "tiny", "output_dir": str(tmp_path),
                          "train": {"train_text_encoder": True, "train_base": "lora"}})


def test_filler_words_are_whole_words_of_the_tokenizer():
    tokenizer = tiny_tokenizer()
    words = filler_words(tokenizer)
    assert len(words) > 10_000 and list(words) == sorted(set(words))
    assert all(word.isalpha() and word.islower() for word in words)
    sample = [words[i] for i in np.random.default_rng(0).integers(len(words), size=40)]
    assert all(len(tokenizer(word, add_special_tokens=False).input_ids) == 1 for word in sample)


def test_filler_words_come_before_the_text_at_their_rate():
    words = ("alpha", "beta", "gamma")
    text = "a red square on the left"
    example = TrainingExample(MultiModalInstruction(text=text, contexts=[]), Image.new("RGB", (8, 8)), "text_to_image")
    rng = np.random.default_rng(5)
    draws = [add_filler_words(example, rng, words, 0.3, 4) for _ in range(2000)]
    changed = [d for d in draws if d is not example]
    assert abs(len(changed) / 2000 - 0.3) < 0.03
    counts = set()
    for drawn in changed:
        assert drawn.instruction.text.endswith(" " + text) and drawn.target is example.target
        prefix = drawn.instruction.text[:-len(text) - 1].split(" ")
        assert set(prefix) <= set(words)
        counts.add(len(prefix))
    assert counts == {1, 2, 3, 4}
    rng = np.random.default_rng(5)
    assert [add_filler_words(example, rng, words, 0.3, 4).instruction.text for _ in range(50)] == \
        [d.instruction.text for d in draws[:50]]
    unconditional = TrainingExample(MultiModalInstruction(text="", contexts=[]), example.target, "text_to_image")
    assert add_filler_words(unconditional, rng, words, 1.0, 4) is unconditional


def test_an_example_s_annotations_reach_the_loss_through_filler_words_and_batches(tmp_path):
    from instruct_core.train.trainer import example_to_tensors

    marks = {"boxes": [(1, 2, 3, 4)]}
    example = TrainingExample(MultiModalInstruction(text="a red square", contexts=[]), Image.new("RGB", (8, 8)),
                              "text_to_image", annotations=marks)
    worded = add_filler_words(example, np.random.default_rng(0), ("zz",), 1.0, 2)
    assert worded.instruction.text.startswith("zz ") and worded.annotations is marks
    assert example_to_tensors(worded, 8).annotations is marks
    assert example_to_tensors(TrainingExample(example.instruction, example.target, "x"), 8).annotations == {}
    from instruct_core.train.retrieval import apply_condition_dropout

    dropped = apply_condition_dropout(worded, np.random.default_rng(0), p_drop_all=1.0, p_drop_context=0.0)
    assert dropped.instruction.text == "" and dropped.annotations is marks
    config = _config(tmp_path, 2, "benchmark", steps=1, batch_size=3, p_filler_words=1.0, max_filler_words=2)
    batch = StepBatches([example] * 4, config, words=("zz",))[0]
    assert len(batch) == 3 and all(e.annotations is marks for e in batch)


def test_step_batches_put_filler_words_before_the_benchmark_texts(tmp_path):
    from instruct_bench.tasks import BenchmarkTaskDataset

    dataset = BenchmarkTaskDataset({"subject": 0.5, "edge_to_image": 0.5}, length=50, seed=0, size=32)
    config = _config(tmp_path, 2, "benchmark", steps=2, batch_size=6, p_filler_words=1.0, max_filler_words=2)
    texts = [e.text for k in range(2) for e in StepBatches(dataset, config, words=("zz",))[k]]
    conditional = [t for t in texts if t]
    assert conditional and all(t.startswith("zz ") and not t.startswith("zz zz zz") for t in conditional)
    config.train.p_filler_words = 0.0
    plain = [e.text for k in range(2) for e in StepBatches(dataset, config)[k]]
    assert not any(t.startswith("zz") for t in plain)
    config.train.p_filler_words = 0.5
    with pytest.raises(ValueError, match="p_filler_words"):
        StepBatches(dataset, config)
