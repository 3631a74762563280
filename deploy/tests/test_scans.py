"""Static scans: checkov over the rendered chart (every values file), the
examples, the Dockerfile and the workflows; hadolint over the Dockerfile;
and the image's own assumptions (non-root, /tmp, health check, labels)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ENVIRONMENTS, EXAMPLES, REPO, documents, render_raw, values_for

BIN = os.path.dirname(sys.executable)
DOCKERFILE = os.path.join(REPO, "deploy", "docker", "Dockerfile")


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory):
    # One directory, one report: the rendered chart, the examples, the
    # Dockerfile and the workflows.
    scan = tmp_path_factory.mktemp("scan")
    rendered = scan / "rendered"
    rendered.mkdir()
    shutil.copytree(EXAMPLES, scan / "examples")
    shutil.copytree(os.path.join(REPO, "deploy", "docker"), scan / "docker")
    shutil.copytree(os.path.join(REPO, ".github"), scan / ".github")
    for env in ENVIRONMENTS:
        for i, doc in enumerate(documents(render_raw(values_for(env)))):
            doc.pop("__template__")
            kind = doc["kind"].lower()
            with open(rendered / f"{env}-{i:03d}-{kind}.yaml", "w") as f:
                yaml.safe_dump(doc, f)
    cmd = [os.path.join(BIN, "checkov"), "--compact", "--skip-download", "-o", "json",
           "--framework", "kubernetes", "dockerfile", "github_actions", "-d", str(scan)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "LOG_LEVEL": "ERROR"})
    assert result.stdout.strip(), result.stderr[-2000:]
    report = json.loads(result.stdout)
    return report if isinstance(report, list) else [report]


def test_checkov_finds_nothing_unwaived(checkov_report):
    scanned = {r["check_type"]: r["summary"] for r in checkov_report}
    assert {"kubernetes", "dockerfile", "github_actions"} <= set(scanned), scanned
    for check_type, summary in scanned.items():
        assert summary["parsing_errors"] == 0, (check_type, summary)
        assert summary["passed"] > 0, (check_type, summary)
    failed = [(r["check_type"], c["check_id"], c["check_name"], c["resource"], c["file_path"])
              for r in checkov_report for c in r["results"]["failed_checks"]]
    assert failed == []


def test_every_checkov_waiver_says_why(checkov_report):
    skipped = [c for r in checkov_report for c in r["results"]["skipped_checks"]]
    assert skipped, "the chart's waivers are expected to be seen"
    for c in skipped:
        reason = (c.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason.split()) >= 5, (c["check_id"], c["resource"], reason)


def test_hadolint_passes_the_dockerfile():
    result = subprocess.run([os.path.join(BIN, "hadolint"), "--failure-threshold", "info", DOCKERFILE],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_stages():
    stages, current = {}, None
    with open(DOCKERFILE) as f:
        text = re.sub(r"\\\n", " ", f.read())
    for line in text.splitlines():
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m.group(2) or m.group(1)
            stages[current] = []
        elif current and line.strip() and not line.lstrip().startswith("#"):
            stages[current].append(line.strip())
    return stages


def test_the_image_runs_unprivileged_with_a_health_check_and_labels():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "runtime", "the runtime stage is last, the default build target"
    runtime = stages["runtime"]
    joined = "\n".join(runtime)
    assert re.search(r"^USER 10001:10001$", joined, re.M), "non-root, numeric (runAsNonRoot can check it)"
    assert "HEALTHCHECK" in joined and "casebook-healthcheck" in joined
    assert re.search(r"^ENTRYPOINT \[\"/usr/local/bin/casebook\"\]$", joined, re.M)
    assert "CASEBOOK_OPS_ADDR=0.0.0.0:9090" in joined and "CASEBOOK_HTTP_ADDR=0.0.0.0:8080" in joined
    assert "HOME=/tmp" in joined and "CASEBOOK_ARCHIVE_DIR=/tmp/archive" in joined
    for label in ("title", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{label}=" in joined, label
    # The model has a layer of its own, before the binary's.
    copies = [line for line in runtime if line.startswith("COPY")]
    assert "--from=model" in copies[0] and "--from=builder" in copies[1]
    # cargo-chef: dependencies are cooked before the sources are copied.
    builder = stages["builder"]
    cook = next(i for i, line in enumerate(builder) if "cargo chef cook --release" in line)
    copy_all = next(i for i, line in enumerate(builder) if line.startswith("COPY . ."))
    assert cook < copy_all
    assert any("cargo build --release --locked" in line for line in builder)


def test_dockerignore_keeps_the_context_small_but_sufficient():
    with open(os.path.join(REPO, ".dockerignore")) as f:
        rules = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "allow-list: everything is excluded unless named"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    with open(os.path.join(REPO, "Cargo.toml")) as f:
        members = re.search(r"members\s*=\s*\[([^\]]*)\]", f.read()).group(1)
    needed = {m.strip().strip('"') for m in members.split(",") if m.strip()}
    needed |= {"Cargo.toml", "Cargo.lock", "src", "migrations", "kb", "deploy/docker/healthcheck.sh"}
    assert needed <= allowed, needed - allowed
    with open(DOCKERFILE) as f:
        for line in re.findall(r"^COPY .*$", f.read(), re.M):
            if "--from=" in line:
                continue
            path = [w for w in line.split()[1:] if not w.startswith("--")][0]
            if path != ".":
                assert path.rstrip("/") in allowed, f"the Dockerfile copies {path}, which .dockerignore excludes"
