"""Reading Snakemake's output, for the workflow tests and the pipeline benchmark."""

from __future__ import annotations


def planned_jobs(snakemake_output: str) -> dict[str, int]:
    """Rule → job count from the "Job stats" table of a ``snakemake -n`` run ({} when nothing to do)."""
    jobs: dict[str, int] = {}
    lines = snakemake_output.splitlines()
    if "Job stats:" not in lines:
        return jobs
    for line in lines[lines.index("Job stats:") + 3 :]:
        fields = line.split()
        if len(fields) != 2 or fields[0] == "total":
            break
        jobs[fields[0]] = int(fields[1])
    return jobs
