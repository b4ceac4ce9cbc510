"""Building the default model: every phase records what it measured, and an interrupted build goes on only
with checkpoints that are its own."""

import copy
import io
import json
import shutil

import pytest

from instruct_bench import build_default as dm
from instruct_bench.tasks import BENCH_MIX
from instruct_bench.cli import main
from instruct_core.progress import Progress
from instruct_core.train.trainer import TrainingError

# The bundled recipe's shape at a size that trains in seconds.
SMALL = {
    "seed": 0,
    "pretrain": {"steps": 3, "batch_size": 4, "lr": 6e-4, "warmup_steps": 1},
    "pretrain_cooldown": {"steps": 2, "batch_size": 4, "lr": 6e-4, "warmup_steps": 0, "lr_schedule": "linear"},
    "stage1": {"steps": 2, "batch_size": 2, "lr": 3e-4, "warmup_steps": 1, "items": 48},
    "stage2": {"steps": 3, "batch_size": 2, "lr": 3e-4, "warmup_steps": 1},
    "stage2_focus": {"steps": 2, "batch_size": 2, "lr": 3e-4, "warmup_steps": 1,
                     "mix": {"subject": 0.5, "style_transfer": 0.5}},
    "stage2_cooldown": {"steps": 2, "batch_size": 2, "lr": 3e-4, "warmup_steps": 0, "lr_schedule": "linear",
                        "mix": {"subject": 0.5, "inpainting": 0.5}},
    "stage2_subjects": {"steps": 2, "batch_size": 2, "lr": 3e-4, "warmup_steps": 0, "lr_schedule": "linear",
                        "mix": {"subject": 0.5, "edge_to_image": 0.5}},
    "stage2_wording": {"steps": 2, "batch_size": 2, "lr": 3e-4, "warmup_steps": 0, "lr_schedule": "linear",
                       "mix": {"subject": 1.0}, "p_filler_words": 0.5, "max_filler_words": 3},
    "stage2_overlap": {"steps": 2, "batch_size": 2, "lr": 2e-4, "warmup_steps": 0, "lr_schedule": "linear",
                       "mix": {"depth_to_image": 0.5, "subject": 0.5}, "p_filler_words": 0.5, "max_filler_words": 3},
    "single_task_steps": 2,
    "probe_size": 8,
}


BUILD_PROGRESS = io.StringIO()  # what the build's progress displays wrote, as they write when piped


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    measured = dm.build(root / "model", root / "work", copy.deepcopy(SMALL), log=lambda line: None,
                        progress=lambda what, steps: Progress(steps, what, stream=BUILD_PROGRESS, every_s=0))
    return root, measured


def test_every_phase_shows_its_progress(built):
    lines = BUILD_PROGRESS.getvalue().splitlines()
    for phase in dm.TRAINING_PHASES:
        steps = SMALL[phase]["steps"]
        assert [line.split(" (")[0] for line in lines if line.startswith(f"{phase}: ")] == [
            f"{phase}: {step}/{steps} step" for step in range(1, steps + 1)], phase


def copy_of(root, tmp_path):
    """A private copy of the built model folder and work folder, for a test that changes them."""
    folder, work = tmp_path / "model", tmp_path / "work"
    shutil.copytree(root / "model", folder)
    shutil.copytree(root / "work", work)
    return folder, work


def test_a_build_saves_a_loadable_model_and_what_each_phase_measured(built):
    root, measured = built
    config = json.loads((root / "model" / "config.json").read_text())
    assert config["build"]["recipe"] == SMALL
    assert config["adapter_config"]["head_dim"] == dm.ADAPTER["head_dim"]
    for phase in dm.TRAINING_PHASES:
        record = measured["phases"][phase]
        assert record["steps"] == SMALL[phase]["steps"] and record["seconds"] > 0, phase
        assert (root / "work" / phase / dm.RUN_RECORD).is_file(), phase
    pipe = dm.load_default(device="cpu", folder=root / "model", super_resolution=False)
    assert all(layer.heads == layer.to_q.out_features // 32 for layer in pipe.model.adapter.layers.values())


def test_a_longer_run_of_the_same_phase_continues_its_checkpoints(built, tmp_path):
    root, measured = built
    folder, work = copy_of(root, tmp_path)
    longer = copy.deepcopy(SMALL)
    longer["stage2"]["steps"] = 5
    again = dm.build(folder, work, longer, phases=("stage2",), log=lambda line: None)["phases"]["stage2"]
    assert again["steps"] == 5
    # the time of the first three steps is carried over from their checkpoint
    assert again["seconds"] > measured["phases"]["stage2"]["seconds"]
    # and its loss before is the first run's, not that of the weights it left
    assert again["probe_loss_before"] == measured["phases"]["stage2"]["probe_loss_before"]


def test_checkpoints_of_other_settings_are_refused(built, tmp_path):
    root, _ = built
    folder, work = copy_of(root, tmp_path)
    other = copy.deepcopy(SMALL)
    other["stage2"]["lr"] = 1e-3
    with pytest.raises(TrainingError, match=r"stage2: holds checkpoints of a run with other settings"):
        dm.build(folder, work, other, phases=("stage2",), log=lambda line: None)
    (work / "stage2" / dm.RUN_RECORD).unlink()
    with pytest.raises(TrainingError, match="unrecorded run"):
        dm.build(folder, work, copy.deepcopy(SMALL), phases=("stage2",), log=lambda line: None)


def test_adapter_checkpoints_on_another_base_are_stale(built, tmp_path):
    import torch

    root, _ = built
    folder, work = copy_of(root, tmp_path)
    pipe = dm.load_default(device="cpu", folder=folder, super_resolution=False)
    with torch.no_grad():  # as if pretraining had been rerun
        pipe.base.unet.conv_in.weight.add_(0.01)
    dm.save_default(pipe, folder)
    with pytest.raises(TrainingError, match="other base_sha256"):
        dm.build(folder, work, copy.deepcopy(SMALL), phases=("stage2",), log=lambda line: None)


def test_the_cli_refuses_a_foreign_work_folder_with_exit_code_2(built, tmp_path, capsys):
    root, _ = built
    folder, work = copy_of(root, tmp_path)
    # the CLI trains the bundled recipe (another batch size and warm-up than SMALL)
    code = main(["build-default", "--phases", "stage2", "--scale", "0.001", "--out", str(folder),
                 "--work-dir", str(work)])
    assert code == 2
    assert "holds checkpoints of a run with other settings;" in capsys.readouterr().err
    assert (work / "stage2" / "checkpoints").is_dir()  # nothing of the earlier run was removed


def test_the_cli_names_an_unknown_phase_and_the_known_ones(tmp_path, capsys):
    assert main(["build-default", "--phases", "stage2,stage3", "--out", str(tmp_path / "m")]) == 2
    error = capsys.readouterr().err
    assert "unknown phase 'stage3'" in error and all(p in error for p in (*dm.TRAINING_PHASES, "ablations"))
    assert not (tmp_path / "m").exists()


# Stages 1 and 2 train the base too, as the bundled recipe does.
SMALL_FULL = copy.deepcopy(SMALL)
for _phase in ("stage1", *dm.STAGE2_PHASES):
    SMALL_FULL[_phase]["train_base"] = "full"
SMALL_FULL["stage2_wording"]["train_text_encoder"] = True
SMALL_FULL["stage2_overlap"]["train_text_encoder"] = True


def _phase_steps(variant_file):
    from safetensors import safe_open

    with safe_open(str(variant_file), framework="pt") as handle:
        return json.loads(handle.metadata()["info"])["phase_steps"]


def _unet_fp16(pipe):
    import torch

    return {k: v.to(torch.float16) for k, v in pipe.base.unet.state_dict().items()}


def _encoder(pipe):
    return pipe.base.text_encoders[0].state_dict()


def _same(a, b):
    """Equal as stored: fp16."""
    import torch

    half = lambda t: t.half() if t.is_floating_point() else t
    return all(torch.equal(half(v), half(b[k])) for k, v in a.items())


def test_stages_that_train_the_base_keep_the_pretrained_one_as_the_text_only_baseline(tmp_path):
    import torch
    from safetensors.torch import load_file

    from instruct_bench.evaluation import variant_pipe

    folder, work, quiet = tmp_path / "model", tmp_path / "work", lambda line: None
    dm.build(folder, work, copy.deepcopy(SMALL_FULL), phases=("pretrain",), log=quiet)
    before_cooldown = _unet_fp16(dm.load_default(device="cpu", folder=folder, super_resolution=False))
    dm.build(folder, work, copy.deepcopy(SMALL_FULL), phases=("pretrain_cooldown",), log=quiet)
    pretrained = _unet_fp16(dm.load_default(device="cpu", folder=folder, super_resolution=False))
    assert any(not torch.equal(pretrained[k], before_cooldown[k]) for k in pretrained)
    snapshot = dm.pretrained_base_file(folder)
    assert not snapshot.exists()
    dm.build(folder, work, copy.deepcopy(SMALL_FULL), phases=("stage1", *dm.STAGE2_PHASES), log=quiet)

    assert dm.is_variant_file(snapshot) and not any(k.startswith("adapter.") for k in load_file(str(snapshot)))
    full = _unet_fp16(variant_pipe("full", folder))
    assert any(not torch.equal(full[k], pretrained[k]) for k in pretrained)  # the stages trained the base
    text_only = variant_pipe("text_only", folder)
    assert all(torch.equal(v, pretrained[k]) for k, v in _unet_fp16(text_only).items())
    assert all(float(layer.to_out.weight.abs().max()) == 0 for layer in text_only.model.adapter.layers.values())
    # the wording phase trained the full model's text encoder; the baseline keeps the one it was pretrained with
    assert not _same(_encoder(text_only), _encoder(variant_pipe("full", folder)))
    assert _same(_encoder(text_only), {k[len("text_encoder."):]: v.float() for k, v in load_file(str(snapshot)).items()
                                       if k.startswith("text_encoder.")})

    dm.build_ablations(("no_stage1",), folder=folder, work_dir=work, recipe=copy.deepcopy(SMALL_FULL), log=quiet)
    ablation = folder / dm.ABLATIONS / "no_stage1.safetensors"
    assert dm.is_variant_file(ablation)
    no_stage1 = variant_pipe("no_stage1", folder)
    assert any(not torch.equal(v, pretrained[k]) and not torch.equal(v, full[k])
               for k, v in _unet_fp16(no_stage1).items())  # trained on its own from the pretrained base
    # and its own text encoder, which it keeps in its file
    assert not _same(_encoder(no_stage1), _encoder(text_only))
    assert not _same(_encoder(no_stage1), _encoder(variant_pipe("full", folder)))
    steps = [SMALL_FULL["stage1"]["steps"] + SMALL_FULL["stage2"]["steps"], SMALL_FULL["stage2_focus"]["steps"],
             SMALL_FULL["stage2_cooldown"]["steps"], SMALL_FULL["stage2_subjects"]["steps"],
             SMALL_FULL["stage2_wording"]["steps"], SMALL_FULL["stage2_overlap"]["steps"]]
    # stage 2 on stage 1's budget, then the same focus, cooldown, subject, wording and overlap phases as the full
    # model
    assert (work / "no_stage1_cooldown" / dm.RUN_RECORD).is_file()
    assert (work / "no_stage1_wording" / dm.RUN_RECORD).is_file()
    assert (work / "no_stage1_overlap" / dm.RUN_RECORD).is_file()
    assert _phase_steps(ablation) == steps
    stored = load_file(str(ablation))
    assert all(torch.equal(v.to(torch.float16), stored["adapter." + k])
               for k, v in no_stage1.model.adapter.state_dict().items())

    # a recipe grown by a phase continues the saved ablation; one that changed an earlier phase trains it again
    shorter = {k: v for k, v in copy.deepcopy(SMALL_FULL).items() if k != "stage2_overlap"}
    dm.build_ablations(("no_stage1",), folder=folder, work_dir=work / "shorter", recipe=shorter, log=quiet)
    assert _phase_steps(ablation) == steps[:5]
    before = _unet_fp16(variant_pipe("no_stage1", folder))
    for run in ("no_stage1", "no_stage1_focus", "no_stage1_cooldown", "no_stage1_subjects", "no_stage1_wording"):
        shutil.rmtree(work / "shorter" / run)  # a continued ablation does not train these again
    lines = []
    dm.build_ablations(("no_stage1",), folder=folder, work_dir=work / "shorter", recipe=copy.deepcopy(SMALL_FULL),
                       log=lines.append)
    assert "no_stage1: continues no_stage1.safetensors after its first 5 phase(s)" in lines
    assert _phase_steps(ablation) == steps
    assert [p.name for p in (work / "shorter").iterdir()] == ["no_stage1_overlap"]
    grown = _unet_fp16(variant_pipe("no_stage1", folder))
    assert any(not torch.equal(v, before[k]) for k, v in grown.items())
    other = copy.deepcopy(SMALL_FULL)
    other["stage2"]["steps"] += 1
    dm.build_ablations(("no_stage1",), folder=folder, work_dir=work / "other", recipe=other, log=quiet)
    assert _phase_steps(ablation) == [steps[0] + 1, *steps[1:]]
    assert (work / "other" / "no_stage1" / dm.RUN_RECORD).is_file()  # trained again from the pretrained base
    other["stage2_focus"]["lr"] /= 2  # another setting than the steps: trained again too
    lines = []
    dm.build_ablations(("no_stage1",), folder=folder, work_dir=work / "lr", recipe=other, log=lines.append)
    assert not any("continues" in line for line in lines)
    assert (work / "lr" / "no_stage1" / dm.RUN_RECORD).is_file()

    dm.build(folder, work / "again", copy.deepcopy(SMALL_FULL), phases=("pretrain",), log=quiet)
    assert not snapshot.exists()  # a new base makes the snapshot of the old one stale


def test_adapter_only_recipes_keep_adapter_files_and_the_shared_base(built, tmp_path):
    import torch

    from instruct_bench.evaluation import variant_pipe

    root, _ = built
    folder, work = copy_of(root, tmp_path)
    dm.build_ablations(("single:edge_to_image",), folder=folder, work_dir=work, recipe=copy.deepcopy(SMALL),
                       log=lambda line: None)
    path = folder / dm.ABLATIONS / "single_edge_to_image.safetensors"
    assert path.is_file() and not dm.is_variant_file(path)
    assert not dm.pretrained_base_file(folder).exists()
    base = _unet_fp16(variant_pipe("full", folder))
    for variant in ("text_only", "single:edge_to_image"):
        assert all(torch.equal(v, base[k]) for k, v in _unet_fp16(variant_pipe(variant, folder)).items()), variant
    with pytest.raises(ValueError, match="single_edge_to_image.safetensors: not a default-model variant"):
        dm.load_variant(path, device="cpu", folder=folder)


def test_a_stage_that_trains_the_base_continues_its_own_result_and_refuses_a_rebuilt_start(tmp_path):
    import torch

    folder, work, quiet = tmp_path / "model", tmp_path / "work", lambda line: None
    dm.build(folder, work, copy.deepcopy(SMALL_FULL), log=quiet)
    longer = copy.deepcopy(SMALL_FULL)
    longer["stage2"]["steps"] = 5
    # the saved model's base is the focus phase's result on stage 2's own: the longer stage 2 goes on from its
    # checkpoints, and the focus run that started from the shorter one is stale
    assert dm.build(folder, work, longer, phases=("stage2",), log=quiet)["phases"]["stage2"]["steps"] == 5
    with pytest.raises(TrainingError, match=r"stage2_focus: holds checkpoints of a run with other base_sha256"):
        dm.build(folder, work, longer, phases=("stage2_focus",), log=quiet)
    shutil.rmtree(work / "stage2_focus")
    assert dm.build(folder, work, longer, phases=("stage2_focus",), log=quiet)["phases"]["stage2_focus"]["steps"] == 2
    longer["stage2_focus"]["steps"] = 4  # the focus phase extends its own result too
    assert dm.build(folder, work, longer, phases=("stage2_focus",), log=quiet)["phases"]["stage2_focus"]["steps"] == 4
    pipe = dm.load_default(device="cpu", folder=folder, super_resolution=False)
    with torch.no_grad():  # as if stage 1 had been rerun differently
        pipe.base.unet.conv_in.weight.add_(0.01)
    dm.save_default(pipe, folder)
    longer["stage2"]["steps"] = 7
    with pytest.raises(TrainingError, match="other base_sha256"):
        dm.build(folder, work, longer, phases=("stage2",), log=quiet)


def test_the_focus_phase_trains_on_its_own_mix_and_a_recipe_names_every_phase_it_runs(tmp_path):
    focus = dm.instruction_dataset("stage2_focus", SMALL["stage2_focus"], seed=0)
    assert {focus.example(i).task for i in range(40)} == {"subject", "style_transfer"}
    stage2 = dm.instruction_dataset("stage2", SMALL["stage2"], seed=0)
    total = sum(BENCH_MIX.values())
    assert stage2.weights == pytest.approx({k: v / total for k, v in BENCH_MIX.items()}) and stage2.seed != focus.seed
    no_focus = {k: v for k, v in SMALL.items() if k != "stage2_focus"}
    with pytest.raises(ValueError, match="recipe: no settings for phase 'stage2_focus'"):
        dm.build(tmp_path / "model", tmp_path / "work", no_focus, phases=("stage2_focus",), log=lambda line: None)


def test_the_cooldown_decays_its_rate_over_its_own_length(built, tmp_path):
    root, measured = built
    cooldown = dm.instruction_dataset("stage2_cooldown", SMALL["stage2_cooldown"], seed=0)
    assert {cooldown.example(i).task for i in range(40)} == {"subject", "inpainting"}
    from instruct_core.train.checkpointing import list_checkpoints, load_checkpoint

    _, state = load_checkpoint(list_checkpoints(root / "work" / "stage2_cooldown" / "checkpoints")[-1])
    assert state["lr_schedule"] == {"schedule": "linear", "warmup_steps": 0, "steps": 2}
    assert measured["phases"]["stage2_cooldown"]["steps"] == 2
    folder, work = copy_of(root, tmp_path)
    longer = copy.deepcopy(SMALL)
    longer["stage2_cooldown"]["steps"] = 4  # a decay planned over 2 steps is not continued over 4
    with pytest.raises(TrainingError, match=r"stage2_cooldown: holds checkpoints of a run with other settings"):
        dm.build(folder, work, longer, phases=("stage2_cooldown",), log=lambda line: None)


def test_a_pretraining_cooldown_on_a_built_model_starts_from_its_pretrained_base(tmp_path):
    """Adding the cooldown to a model built without one continues pretraining, not the stage-2-trained base."""
    import torch

    from instruct_bench.evaluation import variant_pipe

    folder, work, quiet = tmp_path / "model", tmp_path / "work", lambda line: None
    recipe = {k: v for k, v in copy.deepcopy(SMALL_FULL).items() if k != "pretrain_cooldown"}
    dm.build(folder, work, recipe, log=quiet)
    snapshot = dm.pretrained_base_file(folder)
    pretrained = variant_pipe("text_only", folder)
    stage2_trained = _unet_fp16(variant_pipe("full", folder))

    dm.build(folder, work, copy.deepcopy(SMALL_FULL), phases=("pretrain_cooldown",), log=quiet)
    record = json.loads((work / "pretrain_cooldown" / dm.RUN_RECORD).read_text())
    assert record["base_sha256"] == dm.base_digest(pretrained)  # it started from the snapshot
    assert not snapshot.exists()  # the cooled base replaces it: the next stage saves a new one
    cooled = dm.load_default(device="cpu", folder=folder, super_resolution=False)
    assert all(float(layer.to_out.weight.abs().max()) == 0 for layer in cooled.model.adapter.layers.values())
    assert any(not torch.equal(v, stage2_trained[k]) for k, v in _unet_fp16(cooled).items())
    assert any(not torch.equal(v, _unet_fp16(pretrained)[k]) for k, v in _unet_fp16(cooled).items())

    with pytest.raises(TrainingError, match="stage1: holds checkpoints of a run with other base_sha256"):
        dm.build(folder, work, copy.deepcopy(SMALL_FULL), phases=("stage1",), log=quiet)  # they grew from the old base
    dm.build(folder, work / "again", copy.deepcopy(SMALL_FULL), phases=("stage1",), log=quiet)
    assert all(torch.equal(v, _unet_fp16(cooled)[k]) for k, v in _unet_fp16(variant_pipe("text_only", folder)).items())


def test_a_model_saved_again_keeps_its_own_architecture(built, tmp_path):
    root, _ = built
    assert json.loads((root / "model" / "config.json").read_text())["architecture"] == \
        json.loads(json.dumps(dm.ARCHITECTURE))
    # a folder written with other heads than this version's
    other = copy.deepcopy(dm.ARCHITECTURE)
    other["unet"]["attention_head_dim"] = dm.ARCHITECTURE["unet"]["attention_head_dim"] // 2
    folder = tmp_path / "other"
    shutil.copytree(root / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, architecture=other)))
    dm.save_default(dm.load_default(device="cpu", folder=folder, super_resolution=False), tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["architecture"]
    assert again == json.loads(json.dumps(other))
    again_pipe = dm.load_default(device="cpu", folder=tmp_path / "again", super_resolution=False)
    assert again_pipe.base.unet.config.attention_head_dim == other["unet"]["attention_head_dim"]


def test_a_phase_passes_its_filler_words_to_the_trainer(tmp_path):
    config = dm.phase_trainer_config(dm.RECIPE["stage2_wording"], tmp_path, 0, "full")
    assert (config.train.p_filler_words, config.train.max_filler_words) == (0.5, 8)
    assert dm.phase_trainer_config(dm.RECIPE["stage2_subjects"], tmp_path, 0, "full").train.p_filler_words == 0


def test_a_variant_on_the_pretrained_text_encoder_names_it_rather_than_storing_it(built, tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    root, _ = built
    folder, _ = copy_of(root, tmp_path)
    pretrained = dm.pretrained_base_file(folder)
    base = dm.load_default(device="cpu", folder=folder, super_resolution=False)
    dm.save_variant(base, pretrained, {"variant": dm.PRETRAINED_BASE}, with_adapter=False)
    moved = dm.load_default(device="cpu", folder=folder, super_resolution=False)
    with torch.no_grad():  # the default model's encoder moves on, as a phase that trains it leaves it
        for parameter in moved.base.text_encoders[0].parameters():
            parameter.add_(0.01)
    dm.save_default(moved, folder)

    variant = folder / dm.ABLATIONS / "other.safetensors"
    dm.save_variant(base, variant, {"variant": "other"})
    with safe_open(str(variant), framework="pt") as handle:
        assert handle.metadata()["text_encoder"] == "pretrained"
    assert not any(k.startswith("text_encoder.") for k in load_file(str(variant)))
    loaded = dm.load_variant(variant, device="cpu", folder=folder)
    assert _same(_encoder(loaded), _encoder(base)) and not _same(_encoder(loaded), _encoder(moved))

    dm.save_variant(moved, variant, {"variant": "other"})  # an encoder of its own is stored
    assert any(k.startswith("text_encoder.") for k in load_file(str(variant)))
    assert _same(_encoder(dm.load_variant(variant, device="cpu", folder=folder)), _encoder(moved))

    dm.save_variant(base, variant, {"variant": "other"})
    pretrained.unlink()
    with pytest.raises(FileNotFoundError, match="text_only.safetensors is missing"):
        dm.load_variant(variant, device="cpu", folder=folder)
