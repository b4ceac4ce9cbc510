"""Training the context layers (stage 1 or 2) inside ComfyUI, on a dataset in the input directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io
from PIL import Image

from . import paths
from .common import CATEGORY, Model, ModelHandle, node_errors, pil_to_comfy, with_search_aliases

RUNS_FOLDER = "instruct_imagen_runs"  # output/instruct_imagen_runs/<adapter_name>/: checkpoints, report, curve
TRAINING_EXTRAS = {"cv2": "opencv-python-headless", "faiss": "faiss-cpu"}


def dataset_path(dataset: str) -> Path:
    """The dataset inside the input directory: an image folder with .txt captions, or a .jsonl manifest."""
    path = paths.confined_input_path(dataset, "dataset")
    if not (path.is_dir() or path.suffix.lower() == ".jsonl"):
        raise ValueError(f"dataset: {dataset!r} must be a folder of images with .txt captions or a .jsonl manifest")
    return path


def check_dataset_confined(path: Path) -> None:
    """Refuse a dataset any of whose files resolve outside the input directory (through symlinks or paths)."""
    from ..instruct_core.train.data import DataReport, read_dataset

    report = DataReport(source=str(path))
    with node_errors():
        read_dataset(path, report=report, root=folder_paths.get_input_directory())
    escaping = report.skipped.get("outside_root")
    if escaping:
        shown = ", ".join(report.examples.get("outside_root", []))
        raise ValueError(f"dataset: {escaping} files lead outside the input directory ({shown}); remove those "
                         f"links or paths")


class FineTuneStage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return with_search_aliases(io.Schema(
            node_id="FineTuneStage",
            display_name="Fine-Tune Stage (Instruct-Imagen)",
            category=CATEGORY,
            description="Train the context layers on a dataset inside ComfyUI's input directory (stage 2: "
                        "instruction tuning on tasks built from captioned images; stage 1: each image with "
                        "its nearest neighbours). Writes models/instruct_imagen/<adapter_name>.safetensors.",
            inputs=[
                io.Combo.Input("base_model", options=paths.base_model_choices(), default="default"),
                io.Combo.Input("adapter", options=paths.adapter_choices(), default=paths.NO_ADAPTER,
                               tooltip="An adapter to continue training; none: fresh context layers."),
                io.Int.Input("stage", default=2, min=1, max=2),
                io.String.Input("dataset", default="instruct_imagen/train_set",
                                tooltip="A folder of images with .txt captions (or a .jsonl manifest), relative "
                                        "to the input directory."),
                io.Int.Input("steps", default=200, min=1, max=1_000_000),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=1e-7),
                io.Int.Input("batch_size", default=1, min=1, max=256),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=4,
                             tooltip="Training image size; 0: the model's native size."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True),
                io.String.Input("adapter_name", default="my_adapter"),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue the interrupted run of the same adapter_name."),
            ],
            outputs=[
                Model.Output(display_name="model"),
                io.String.Output(display_name="adapter"),
                io.Image.Output(display_name="loss_curve"),
            ],
            is_output_node=True,
        ), "train lora", "training", "finetune", "dreambooth")

    @classmethod
    def execute(cls, base_model: str, adapter: str, stage: int, dataset: str, steps: int, learning_rate: float,
                batch_size: int, resolution: int, seed: int, adapter_name: str, resume: bool) -> io.NodeOutput:
        source = dataset_path(dataset)
        check_dataset_confined(source)
        target = paths.adapter_save_path(adapter_name)
        run_dir = Path(folder_paths.get_output_directory()) / RUNS_FOLDER / target.stem
        if not resume and (run_dir / "checkpoints").is_dir():
            shutil.rmtree(run_dir / "checkpoints")  # an older run's checkpoints would be resumed by mistake later
        base = paths.resolve_base_model(base_model)
        start = paths.resolve_adapter(adapter)
        settings = {
            "stage": stage, "base_model": base, "adapter": start, "output_dir": str(run_dir),
            "data": {"source": str(source), "resolution": resolution or None},
            "train": {"steps": steps, "batch_size": batch_size, "lr": learning_rate, "seed": seed,
                      "warmup_steps": min(100, steps // 10)},
            "checkpoint": {"every": max(1, min(100, steps))},
        }
        # ComfyUI runs nodes under inference mode; training needs autograd and tensors made outside it.
        with torch.inference_mode(False), torch.enable_grad():
            result, handle = cls.train(settings, resume, steps, base_model)
        pipe = handle.pipe
        pipe.model.eval().requires_grad_(False)
        if result.cancelled:
            comfy.model_management.throw_exception_if_processing_interrupted()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.adapter_path, target.with_name(target.name + ".tmp"))
        os.replace(target.with_name(target.name + ".tmp"), target)
        handle.adapter = target.name
        curve = pil_to_comfy(Image.open(run_dir / "loss_curve.png"))
        return io.NodeOutput(handle, target.name, curve, ui={"text": [f"{result.step} steps, adapter {target}"]})

    @classmethod
    def train(cls, settings: dict, resume: bool, steps: int, base_model: str):
        from ..instruct_core.models import load_pipeline
        from ..instruct_core.train.config import config_from_dict

        progress = comfy.utils.ProgressBar(steps)

        def report(step: int, total: int, loss: float) -> None:
            # The progress hook raises on interrupt; leave that to `cancel` so a checkpoint is written first.
            if not comfy.model_management.processing_interrupted():
                progress.update_absolute(step, total)

        with node_errors():
            if settings["data"]["resolution"] is None:
                settings["data"].pop("resolution")
            try:
                from ..instruct_core.train.stages import adapter_config_of, run_training

                config = config_from_dict(settings)
                pipe = load_pipeline(config.base_model, config.adapter, dtype="fp32",
                                     device=str(comfy.model_management.unet_offload_device()),
                                     adapter_config=adapter_config_of(config))
                handle = ModelHandle(pipe, base_model, None, "fp32")
                # Training takes the device: every other model is offloaded first, as ComfyUI's own training
                # node does.
                handle.on_compute_device(memory_required=1e20)
                if "resolution" not in settings["data"]:
                    config.data.resolution = pipe.native_size
                result = run_training(config, pipe=pipe, progress=report,
                                      cancel=comfy.model_management.processing_interrupted, resume=resume)
            except ImportError as error:
                package = TRAINING_EXTRAS.get((error.name or "").split(".")[0])
                if package is None:
                    raise
                raise ValueError(f"FineTuneStage needs {package} for stage {settings['stage']}: "
                                 f"pip install {package} (into ComfyUI's Python)") from None
        return result, handle
