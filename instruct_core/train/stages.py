"""The two training stages, from a TrainConfig to an adapter file.

Stage 1 (retrieval-augmented): every image is learned with 3 of its nearest neighbours as contexts.
Stage 2 (instruction tuning): a mixture of tasks built on the fly, or a JSONL of ready-made instructions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .. import limits
from ..context_unet import ContextAdapterConfig
from .data import DataReport, read_dataset
from ..instruction import DEFAULT_MODALITIES
from ..pipeline import InstructImagen
from .config import ConfigError, TrainConfig
from .trainer import Trainer, TrainResult, training_folder_lock


def adapter_config_of(config: TrainConfig) -> ContextAdapterConfig:
    settings = config.adapter_config
    return ContextAdapterConfig(
        levels=None if settings.levels is None else tuple(settings.levels),
        modalities=tuple(settings.modalities or DEFAULT_MODALITIES), max_contexts=settings.max_contexts)


def build_stage1_data(config: TrainConfig, pipe: InstructImagen, report: dict):
    from .retrieval import (ModelEmbedder, PixelEmbedder, PrecomputedEmbedder, RetrievalExamples, build_index,
                            form_clusters, save_clusters)

    data_report = DataReport(source=str(config.data.source))
    items = read_dataset(config.data.source, report=data_report)
    report["data"] = data_report.to_dict()
    if config.data.embeddings:
        embedder = PrecomputedEmbedder(config.data.embeddings)
    elif config.data.embedder == "pixel":
        embedder = PixelEmbedder()
    else:
        embedder = ModelEmbedder(pipe, size=config.data.resolution)
    embeddings = embedder.embed(items)
    index = build_index(embeddings, kind=config.data.index)
    clusters, stats = form_clusters(embeddings, index)
    report["clusters"] = stats.to_dict()
    if not clusters:
        raise ConfigError(f"data.source: no neighbour clusters could be formed from {len(items)} items "
                          f"({stats.summary()}); stage 1 needs groups of similar images")
    save_clusters(Path(config.output_dir) / "clusters.json", clusters, items=items, stats=stats)
    return RetrievalExamples(items, clusters, num_context=3, seed=config.train.seed)


def build_stage2_data(config: TrainConfig, report: dict):
    from .instruction_tasks import InstructionJsonlDataset, TaskMixture, parse_mix

    if config.data.instructions:
        dataset = InstructionJsonlDataset(config.data.instructions)
        report["instructions"] = {"examples": len(dataset), "bad_lines": dataset.bad_lines[:20]}
        if len(dataset) == 0:
            raise ConfigError(f"data.instructions: no usable line in {config.data.instructions}")
        return dataset
    data_report = DataReport(source=str(config.data.source))
    items = read_dataset(config.data.source, report=data_report)
    report["data"] = data_report.to_dict()
    try:
        mix = parse_mix(config.data.mix)
    except ValueError as error:
        raise ConfigError(f"data.mix: {error}") from None
    mixture = TaskMixture(mix, items, seed=config.train.seed, phrasings="train")
    report["tasks"] = mixture.report
    return mixture


def check_training_memory(config: TrainConfig, pipe: InstructImagen) -> None:
    """Refuse, naming train.batch_size, a step whose estimated memory is over the limit, before any data is read."""
    model = pipe.model
    parameters = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.adapter.parameters())
    if config.train.train_base == "full":
        trained = parameters
    resolution, batch = config.data.resolution, config.train.batch_size
    needed = limits.estimate_training_bytes(pipe.model_facts(), resolution, batch, pipe.max_contexts, parameters,
                                            trained)
    limits.check_memory("train.batch_size", needed,
                        f"a step of {batch} examples at {resolution}x{resolution} with up to {pipe.max_contexts} "
                        f"contexts")


def run_training(config: TrainConfig, *, pipe: InstructImagen | None = None,
                 progress: Callable[[int, int, float], None] | None = None,
                 cancel: Callable[[], bool] | None = None, resume: bool = False,
                 device: str = "auto") -> TrainResult:
    """Train one stage as configured; the Python entry point behind the CLI and the FineTuneStage node."""
    from ..models import load_pipeline

    if pipe is None:
        pipe = load_pipeline(config.base_model, config.adapter, device=device, dtype="fp32",
                             adapter_config=adapter_config_of(config))
    check_training_memory(config, pipe)
    output_dir = Path(config.output_dir)
    with training_folder_lock(output_dir):  # before anything is written there
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        report: dict = {"stage": config.stage}
        dataset = build_stage1_data(config, pipe, report) if config.stage == 1 else build_stage2_data(config, report)
        trainer = Trainer(config, pipe, dataset, progress=progress, cancel=cancel, report=report)
        return trainer.run(resume=resume)
