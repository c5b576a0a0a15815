"""Run the curation stages on datatrove executors, resumably, in a work directory beside the output store.

Work directory layout (kept across interrupted runs, deleted once the store is published):
  settings.json             what this work directory is for; a different request restarts it from scratch
  input/{rank}.jsonl.gz     the source's documents (normalised, capped by max_documents), one shard per task
  exact/, minhash/          datatrove's signature, bucket and cluster files
  after_exact/              documents kept by exact dedup (MinHash's signatures index these)
  removed/{stage}/          documents each stage removed, with datatrove's `filter_reason` (exclusion writers);
                            removed/c4_trimmed/: documents C4 kept but cut lines from, as they were
  tally/{stage}/            documents and characters leaving each stage, per task
  curated/{rank}.jsonl.gz   what gets tokenised
  logs/{pipeline}/          datatrove's logs, stats and completion markers: finished tasks are skipped on a rerun
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from hybridlm.data.curation.config import CurationConfig
from hybridlm.data.curation.steps import (
    DecontaminationFilter,
    ProseOnly,
    ShardReader,
    StageTally,
    exact_dedup_key,
    iter_eval_items,
    looks_like_code,
    normalise_text,
    shard_name,
    words,
)

log = logging.getLogger(__name__)
SLURM_POLL_S = 2.0


def check_eval_sets(curation: CurationConfig) -> dict:
    """Read every eval item once before any work (bad lines fail here); counts for the report."""
    if "decontaminate" not in curation.stages:
        return {}
    items = short = 0
    for _, text in iter_eval_items(curation.decontaminate, curation.decontaminate_field):
        items += 1
        short += len(words(text)) < curation.decontaminate_ngram
    if items == short:
        raise ValueError(
            f"--decontaminate {curation.decontaminate}: none of its {items} items has "
            f"{curation.decontaminate_ngram} words, so nothing can match; lower --decontaminate-ngram"
        )
    return {"eval_items": items, "eval_items_shorter_than_ngram": short}


def prepare_work_dir(work_dir: Path, identity: dict) -> None:
    """Resume `work_dir` when it was started for the same `identity`; otherwise start it afresh."""
    settings = work_dir / "settings.json"
    if work_dir.exists():
        if settings.is_file() and json.loads(settings.read_text()) == identity:
            log.info("resuming curation in %s (finished tasks are skipped)", work_dir)
            return
        log.info("curation work directory %s was for other settings or is incomplete: starting afresh", work_dir)
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    settings.write_text(json.dumps(identity, indent=2, sort_keys=True))


def count_input(documents: Iterator[str]) -> int:
    """A first pass over the source: a bad file or an empty source fails here, before any work."""
    count = sum(1 for _ in documents)
    if not count:
        raise ValueError("the source gives no documents to curate; check --paths / --max-documents")
    return count


def materialise_input(documents: Iterator[str], count: int, folder: Path, tasks: int) -> None:
    """Stream the `count` documents into `tasks` shards of contiguous runs (so the output keeps source order),
    normalised and tagged as code or prose; the folder appears atomically, so a rerun never reads a partial one."""
    if folder.is_dir():
        return
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    per_task = -(-count // tasks)
    handles = [gzip.open(partial / shard_name(rank), "wt", encoding="utf-8") for rank in range(tasks)]
    try:
        for index, text in enumerate(documents):
            text = normalise_text(text)
            metadata = {"kind": "code" if looks_like_code(text) else "prose"}
            handles[index // per_task].write(json.dumps({"text": text, "id": str(index), "metadata": metadata}) + "\n")
    finally:
        for handle in handles:
            handle.close()
    partial.rename(folder)


def build_pipelines(curation: CurationConfig, work: Path) -> list[tuple[str, list, int]]:
    """(name, steps, tasks) of each datatrove pipeline, in dependency order."""
    from datatrove.pipeline.dedup import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.writers import JsonlWriter

    stages, tasks = curation.stages, curation.tasks
    tally = work / "tally"

    def removed(stage: str) -> JsonlWriter:
        return JsonlWriter(str(work / "removed" / stage))

    pipelines = []
    steps: list = [ShardReader(work / "input", "read"), StageTally(tally, "input")]
    if "exact" in stages:
        exact = ExactDedupConfig(content_getter=exact_dedup_key)
        pipelines.append(("exact_signatures", [*steps, ExactDedupSignature(str(work / "exact" / "sigs"), exact)],
                          tasks))  # fmt: skip
        pipelines.append(("exact_find", [ExactFindDedups(str(work / "exact" / "sigs"), str(work / "exact" / "dups"),
                                                         exact, save_cluster_size=True)], 1))  # fmt: skip
        steps = [ShardReader(work / "input", "exact dedup"),
                 ExactDedupFilter(str(work / "exact" / "dups"), exact, exclusion_writer=removed("exact")),
                 StageTally(tally, "exact", histogram_field="duplicate_count")]  # fmt: skip
    if "minhash" in stages:
        settings = curation.minhash
        config = MinhashConfig(n_grams=settings.ngram, num_buckets=settings.bands, hashes_per_bucket=settings.rows,
                               seed=settings.seed)  # fmt: skip
        minhash = work / "minhash"
        signatures = MinhashDedupSignature(str(minhash / "sigs"), config)
        buckets = MinhashDedupBuckets(str(minhash / "sigs"), str(minhash / "buckets"), config=config)
        clusters = MinhashDedupCluster(str(minhash / "buckets"), str(minhash / "remove"), config=config,
                                       save_cluster_size=True)  # fmt: skip
        pipelines.append(("minhash_signatures", [*steps, JsonlWriter(str(work / "after_exact")), signatures], tasks))
        pipelines.append(("minhash_buckets", [buckets], settings.bands))  # one task per band (datatrove's layout)
        pipelines.append(("minhash_cluster", [clusters], 1))
        steps = [ShardReader(work / "after_exact", "minhash dedup"),
                 MinhashDedupFilter(str(minhash / "remove"), exclusion_writer=removed("minhash"),
                                    load_cluster_sizes=True),
                 StageTally(tally, "minhash", histogram_field="minhash_cluster_size")]  # fmt: skip
    filters = {
        "gopher_repetition": lambda out: ProseOnly(GopherRepetitionFilter(**vars(curation.gopher_repetition)), out),
        "gopher_quality": lambda out: ProseOnly(GopherQualityFilter(**vars(curation.gopher_quality)), out),
        "c4": lambda out: ProseOnly(C4QualityFilter(**vars(curation.c4)), out, trimmed_writer=removed("c4_trimmed")),
        "fineweb_quality": lambda out: ProseOnly(FineWebQualityFilter(**vars(curation.fineweb_quality)), out),
        "decontaminate": lambda out: DecontaminationFilter(curation.decontaminate, curation.decontaminate_field,
                                                           curation.decontaminate_ngram, out),  # fmt: skip
    }
    for stage, make in filters.items():
        if stage in stages:
            steps += [make(removed(stage)), StageTally(tally, stage)]
    pipelines.append(("filter", [*steps, JsonlWriter(str(work / "curated"))], tasks))
    return pipelines


def run_pipelines(curation: CurationConfig, work: Path) -> None:
    pipelines = build_pipelines(curation, work)
    started = time.perf_counter()
    if curation.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        for name, steps, tasks in pipelines:
            log.info("curation: %s (%d tasks)", name, tasks)
            LocalPipelineExecutor(steps, tasks=tasks, workers=min(curation.workers, tasks),
                                  logging_dir=str(work / "logs" / name), start_method="fork").run()  # fmt: skip
    else:
        _run_on_slurm(curation, work, pipelines)
    incomplete = [name for name, _, tasks in pipelines if not _completed(work / "logs" / name, tasks)]
    if incomplete:
        raise RuntimeError(f"curation pipelines {incomplete} did not finish; see {work / 'logs'} and rerun to resume")
    log.info("curation pipelines finished in %.1fs", time.perf_counter() - started)


def _completed(logging_dir: Path, tasks: int) -> bool:
    return all((logging_dir / "completions" / f"{rank:05d}").exists() for rank in range(tasks))


def _run_on_slurm(curation: CurationConfig, work: Path, pipelines: list) -> None:
    """One job array per pipeline, each depending on the previous (datatrove's `depends`); then wait for them."""
    from datatrove.executor import SlurmPipelineExecutor

    previous = None
    executors = []
    for name, steps, tasks in pipelines:
        previous = SlurmPipelineExecutor(
            steps, tasks=tasks, time=curation.slurm_time, partition=curation.slurm_partition,
            cpus_per_task=curation.slurm_cpus_per_task, mem_per_cpu_gb=curation.slurm_mem_per_cpu_gb,
            job_name=f"curate-{name}", qos="", logging_dir=str(work / "logs" / name), depends=previous,
            # The jobs run datatrove's launch_pickled_pipeline from the environment running prepare-data.
            env_command=f'export PATH="{Path(sys.executable).parent}:$PATH"',
        )  # fmt: skip
        executors.append((name, tasks, previous))
    previous.run()  # launches the whole chain
    job_ids = [str(executor.job_id) for _, _, executor in executors if executor.job_id not in (None, -1)]
    log.info("curation: submitted Slurm jobs %s; waiting", ", ".join(job_ids) or "(none: all tasks done)")
    last_name, last_tasks, _ = executors[-1]
    while not _completed(work / "logs" / last_name, last_tasks):
        queue = subprocess.run(["squeue", "--noheader", "--format=%i %r", "--jobs", ",".join(job_ids)],
                               capture_output=True, text=True).stdout.splitlines()  # fmt: skip
        # A failed job leaves the next one pending for good (afterok), with this reason.
        stuck = [line.split()[0] for line in queue if "DependencyNeverSatisfied" in line]
        if stuck or (job_ids and not queue and not _completed(work / "logs" / last_name, last_tasks)):
            subprocess.run(["scancel", *stuck], capture_output=True)
            raise RuntimeError(
                f"curation Slurm jobs {job_ids} stopped before finishing; see their logs under "
                f"{work / 'logs'}/*/slurm_logs and rerun to resume"
            )
        time.sleep(SLURM_POLL_S)


def curated_documents(work: Path, tasks: int) -> Iterator[str]:
    """The curated documents in source order (task shards in rank order)."""
    for rank in range(tasks):
        path = work / "curated" / shard_name(rank)
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                for line in handle:
                    yield json.loads(line)["text"]


def removed_documents(work: Path, stage: str) -> Iterator[dict]:
    for path in sorted((work / "removed" / stage).glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)
