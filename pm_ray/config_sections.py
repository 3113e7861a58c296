"""The sections of the run configuration (typed pydantic models); `pm_ray.config` assembles them
into `RunConfig` and loads YAML with dotted overrides."""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name_or_path: str = "bundled:smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class LoraSection(Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | str | None = None  # None: per-architecture k,v projections; "all-linear"


class TaskFile(Section):
    """One task of `tasks.files` (see pm_ray/data/sources.py): train + test files, or one `path`
    holding every example (BIG-bench task.json, SuperNI JSON, `bigbench:<task>`) split here."""

    name: str
    kind: Literal["instruction", "classification"] = "instruction"
    format: Literal["auto", "jsonl", "parquet", "alpaca", "trace", "bigbench", "superni"] = "auto"
    train: str | None = None
    test: str | None = None
    path: str | None = None
    max_train: int | None = Field(None, ge=1)
    max_test: int | None = Field(None, ge=1)
    seed: int = 0
    choices_in_prompt: Literal["auto", "list", "hide"] = "auto"  # BIG-bench append_choices_to_input
    positive_examples: int = Field(0, ge=0)  # SuperNI: demonstrations prepended to the definition
    instruction_part: Literal["full", "prompt"] = "full"  # "prompt": an NI v1 prefix's `Prompt:` line

    @model_validator(mode="after")
    def _one_layout(self) -> TaskFile:
        single, pair = self.path is not None, (self.train, self.test) != (None, None)
        if single == pair or (pair and None in (self.train, self.test)):
            raise ValueError(
                "give either path (one file with every example, split by max_test/max_train/seed) "
                "or both train and test"
            )
        return self


class TasksSection(Section):
    suite: str | None = "bbni"
    variant: Literal["full", "quick"] = "quick"
    seed: int = 0
    files: list[TaskFile] = []
    limit: int | None = Field(None, ge=1)  # only the first N tasks of the stream
    # Prompt style of the suite's BIG-bench multiple-choice tasks: auto = each task's own
    # append_choices_to_input (BIG-bench's default: list the choices), list / hide = force it.
    choices_in_prompt: Literal["auto", "list", "hide"] = "auto"
    # Rows held out of every task's training split (never trained on) to choose settings on with
    # eval.split=validation; pm_ray/data/validation.py.
    validation_rows: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> TasksSection:
        if self.files and self.suite:
            raise ValueError("give either tasks.suite or tasks.files, not both (set tasks.suite=null to use files)")
        if not self.files and not self.suite:
            raise ValueError("no tasks: set tasks.suite (bbni or cit5) or list tasks.files")
        return self


class PerturbationSection(Section):
    mode: Literal["none", "task_vector", "gaussian"] = "task_vector"
    epsilon: float = 0.5
    probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)

    @field_validator("epsilon")
    @classmethod
    def _epsilon(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"epsilon={value} is outside [0, 1)")
        return value

    @field_validator("probs")
    @classmethod
    def _probs(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(p < 0 for p in value) or not math.isclose(sum(value), 1.0, abs_tol=1e-6):
            raise ValueError(f"probs={list(value)} must be three non-negative numbers summing to 1")
        return value


class MergeSection(Section):
    strategy: str = "pm"
    options: dict[str, Any] = {}  # strategy constructor options, e.g. {per_module: true}, {lam: 0.5}
    shards: int = Field(1, ge=1)  # merge actors, each owning a slice of the modules
    # default: Ray's default scheduling (beside the driver while it has room); spread: shard k on the
    # k-th alive node (pinned; recreated elsewhere if that node dies), so no node holds all the merge state
    shard_placement: Literal["default", "spread"] = "default"

    @field_validator("strategy")
    @classmethod
    def _known(cls, value: str) -> str:
        from pm_ray.core.strategies import available_strategies

        names = available_strategies()
        if value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown strategy {value!r}{hint}; expected one of {names}")
        return value

    @model_validator(mode="after")
    def _options(self) -> MergeSection:
        """``options`` against the strategy's typed Options (names, types, bounds), at load time."""
        from pm_ray.core.strategies import StrategyOptionError, check_options

        try:
            check_options(self.strategy, self.options)
        except StrategyOptionError as err:
            key, text = err.problems[0]
            where = f"merge.options.{key}" if key else "merge.options"
            raise PydanticCustomError("strategy_option", "{where}: {text}", {"where": where, "text": text}) from None
        return self


class OrthogonalSection(Section):
    """O-LoRA (arXiv 2310.14152; pm_ray/core/orthogonal.py): task t's loss adds
    lam · Σ_{i<t} Σ_m ‖A_i[m] A_t[m]ᵀ‖²_F + l2 · Σ_m (‖A_t[m]‖²_F + ‖B_t[m]‖²_F). A training-time
    term, so it combines with any merge strategy; merge.strategy=olora turns it on with sequential
    merging."""

    enabled: bool | None = None  # None: on for a strategy that implies it (olora), off for the others
    lam: float = Field(0.5, ge=0, allow_inf_nan=False)  # λ₁ (0.5 in the paper)
    l2: float = Field(0.0, ge=0, allow_inf_nan=False)  # λ₂ (small in the paper)


class FisherSection(Section):
    num_samples: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)


class TrainerSection(Section):
    num_workers: int = Field(2, ge=1)
    engine: Literal["deepspeed", "ddp", "single"] = "deepspeed"
    # 0-2 partition optimizer state / gradients (LoRA's are tiny); 3 also partitions the frozen
    # base weights, for backbones that do not fit one device (pm_ray/train/zero3.py, docs/scale.md).
    zero_stage: int = Field(2, ge=0)
    deepspeed_config: dict[str, Any] | str | None = None  # inline dict or a JSON file path
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # Ray Train's ScalingConfig.placement_strategy for the worker group's placement group: PACK (Ray's
    # default) fills one node first; SPREAD puts workers on distinct nodes where it can (soft: after a
    # node failure the group restarts on the nodes left); the STRICT_ forms refuse to place otherwise.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    batch_size: int = Field(8, ge=1)  # per worker
    # Where each worker's training batches come from; the rows, their order and so the results are
    # the same either way (docs/pipeline.md "Training data"). local: the worker reads its rows of the
    # task table and tokenises them itself. ray_data: the driver gives the TorchTrainer one Ray
    # Dataset per task and rank, tokenised by Ray Data tasks, read with ray.train.get_dataset_shard;
    # a run without a TorchTrainer (engine=single, or one ddp worker) reads locally.
    data_loader: Literal["local", "ray_data"] = "local"
    lr: float = Field(1e-3, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    steps_per_task: int = Field(60, ge=1)
    max_length: int = Field(128, ge=8)
    # bf16-mixed: fp32 weights (the merge folds into them exactly), every forward (training, Fisher,
    # evaluation) under torch.autocast(bfloat16), as Lightning's "bf16-mixed"; on CPUs with AMX or
    # AVX512-BF16 that is ~1.5x faster training and ~2x faster scoring, on CPUs without them several
    # times slower (docs/performance.md). auto: bf16-mixed where each worker's hardware has bf16, else fp32.
    precision: Literal["auto", "fp32", "bf16-mixed"] = "fp32"
    # Classification streams (one head per task): the training and Fisher cross-entropy of task t
    # over task t's own classes (own: the old classes masked, as L2P / DualPrompt train) or over every
    # seen task's classes (seen: heads 1..t-1 frozen, so the new LoRA and head also learn to beat the
    # old classes on the new inputs; measured in docs/results.md, it makes sequential forget all).
    head_logits: Literal["own", "seen"] = "own"
    seed: int = 0
    max_failures: int = Field(1, ge=0)
    log_every: int = Field(5, ge=1)

    @field_validator("zero_stage")
    @classmethod
    def _zero_stage(cls, value: int) -> int:
        if value > 3:
            raise ValueError(f"ZeRO stage {value} does not exist: expected 0, 1, 2 or 3")
        return value

    @model_validator(mode="after")
    def _zero3_needs_deepspeed(self) -> TrainerSection:
        if self.zero_stage == 3 and self.engine != "deepspeed":
            raise ValueError(
                f"trainer.zero_stage=3 partitions parameters with DeepSpeed: it needs trainer.engine=deepspeed, "
                f"not {self.engine!r}"
            )
        return self


class EvalSection(Section):
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    max_rows: int | None = Field(40, ge=1)  # test rows per task (None: all)
    split: Literal["test", "validation"] = "test"  # validation: the tasks.validation_rows held out of train


class DiagnosticsSection(Section):
    first_steps: int = Field(5, ge=0)  # loss drop / grad norm measured over the first steps of each task


class StorageSection(Section):
    path: str = "./runs"
    run_name: str | None = None  # default: <strategy>-<config file stem>


class TrackingSection(Section):
    enabled: bool = True
    uri: str | None = None  # default sqlite:///<run_dir>/mlflow.db
    experiment: str = "pm-ray"


class RaySection(Section):
    address: str | None = None  # None: RAY_ADDRESS or an embedded local Ray
    driver_cpus: float = Field(0.1, ge=0)
