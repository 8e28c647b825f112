"""The `resources` and `run` sections: where branches run, and how a run is kept."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from copd.config.fields import Section, TrackerName, tracker_list


class BranchResources(Section):
    cpus: float | None = Field(None, gt=0, description="CPUs of this branch (default: resources.cpus_per_branch)")
    gpus: float | None = Field(None, ge=0, description="GPUs of this branch (default: resources.gpus_per_branch)")
    ranks: int | None = Field(None, gt=0, strict=True, description="ranks of this branch (default: resources.ranks_per_branch)")


class ResourcesConfig(Section):
    """What each branch reserves with run.backend: ray: one actor per rank, each in its bundle of a placement group."""

    cpus_per_branch: float = Field(1.0, gt=0, description="CPUs per branch, shared by its ranks; an actor's torch threads are its share, rounded down (at least 1)")
    gpus_per_branch: float = Field(0.0, ge=0, description="GPUs per branch (0: the branch runs on CPU); a branch of several ranks takes one GPU per rank")
    ranks_per_branch: int | None = Field(None, gt=0, strict=True, description="processes per branch, each holding 1/ranks of the weights, gradients and AdamW state (FSDP2) and training on 1/ranks of each step's prompt groups; default: one per GPU, or 1 on CPU")
    branches: dict[str, BranchResources] = Field(default_factory=dict, description="per-branch overrides, e.g. {text: {gpus: 2}} for a hub")

    def of(self, branch: str) -> tuple[float, float]:
        """(cpus, gpus) of one branch, all its ranks together."""
        own = self.branches.get(branch, BranchResources())
        return (own.cpus or self.cpus_per_branch, self.gpus_per_branch if own.gpus is None else own.gpus)

    def ranks_of(self, branch: str) -> int:
        """The branch's rank count: as set, else one per whole GPU, else 1."""
        own = self.branches.get(branch, BranchResources())
        ranks = own.ranks or self.ranks_per_branch
        if ranks is not None:
            return ranks
        gpus = self.of(branch)[1]
        return int(gpus) if gpus >= 1 and gpus == int(gpus) else 1

    def bundles(self, branch: str) -> list[dict[str, float]]:
        """One Ray bundle per rank of the branch: its share of the branch's CPUs and GPUs."""
        (cpus, gpus), ranks = self.of(branch), self.ranks_of(branch)
        return [{"CPU": cpus / ranks, **({"GPU": gpus / ranks} if gpus else {})} for _ in range(ranks)]


class RunConfig(Section):
    out: str = Field("runs/copd", description="run directory")
    config_dir: str | None = Field(None, description="the folder of the config file a run was started from: copd train sets it and writes it into RUN/config.yaml, so that copd eval and copd diagnose find the run's relative data paths and verifier modules from any working directory (unset: the working directory)")
    backend: Literal["local", "ray"] = Field("local", description="local: every branch in this process (the reference); ray: one Ray actor per branch (needs copd[ray])")
    ray_address: str | None = Field(None, description="with backend ray: the address of a running cluster (`ray start --head` prints it); unset: start a local Ray")
    max_restarts: int = Field(3, ge=0, strict=True, description="when a branch's worker dies, restart every branch from the last checkpoint all of them completed, up to this many times")
    restart_timeout: float = Field(300.0, gt=0, description="with backend ray: seconds a restarted branch's new actor has to be placed and to build its model; past that (its node lost, say, and no other with room) the run stops with an error that says how to resume")
    seed: int = Field(0, description="seed of sampling, data order and initialisation")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where branches train; auto picks cuda when available")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice)")
    keep_checkpoints: int = Field(2, gt=0, description="cycle checkpoints kept on disk")
    report_to: Annotated[list[TrackerName], BeforeValidator(tracker_list)] = Field(
        default_factory=list, description="experiment trackers that also get every metrics.jsonl record, the config and the report's plots: tensorboard (event files in RUN/tensorboard), wandb (WANDB_MODE=offline keeps it local), trackio; each is an optional extra, pip install 'copd[NAME]'")
    project: str = Field("copd", description="project of the wandb and trackio runs; a run is named after its folder")
