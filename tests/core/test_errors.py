"""One exception type: every error class of the library and the harness extends InstructImagenError, so the CLI
and the nodes catch that one; a weight file that was asked for and is missing is such an error, naming the file."""

import importlib
import inspect
import json
import pkgutil
import shutil

import pytest

import instruct_bench
import instruct_core
from instruct_core.errors import InstructImagenError, MissingFileError
from instruct_core.models import DEFAULT_MODEL_DIR, load_default

NOT_ERRORS = {"SamplingCancelled"}  # a cancel the caller asked for, like KeyboardInterrupt, not a fault


def error_classes():
    for package in (instruct_core, instruct_bench):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if (cls.__module__ == module.__name__ and issubclass(cls, Exception)
                        and not issubclass(cls, Warning) and name not in NOT_ERRORS
                        and not name.startswith("_")):  # private: caught inside its module, never raised out
                    yield cls


def test_every_error_class_extends_the_one_base():
    classes = list(error_classes())
    assert len(classes) >= 11
    assert [c.__qualname__ for c in classes if not issubclass(c, InstructImagenError)] == []


def test_a_missing_default_model_file_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, folder, ignore=shutil.ignore_patterns("model.safetensors", "examples"))
    with pytest.raises(MissingFileError, match=str(folder / "model.safetensors")):
        load_default(device="cpu", folder=folder)


def test_the_text_only_baseline_never_falls_back_to_another_model(tmp_path):
    from instruct_bench.evaluation import variant_pipe

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(DEFAULT_MODEL_DIR / "config.json", folder / "config.json")  # a recipe that trains the base
    assert any(settings.get("train_base", "adapter") != "adapter" for settings in
               json.loads((folder / "config.json").read_text())["build"]["recipe"].values()
               if isinstance(settings, dict))
    with pytest.raises(MissingFileError, match="text_only.safetensors"):
        variant_pipe("text_only", folder=folder)
    with pytest.raises(MissingFileError, match="no_stage1.safetensors"):
        variant_pipe("no_stage1", folder=folder)


def test_the_cli_reports_a_library_error_in_one_line(tmp_path, capsys):
    from instruct_core.cli import main

    assert main(["generate", "--instruction", str(tmp_path / "none.json"), "--out", str(tmp_path / "x.png"),
                 "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "none.json" in err
