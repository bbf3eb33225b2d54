"""End to end, against real Prefect servers: the deployments of `deployments/prefect.yaml`
served by `deployments/serve.py` (which starts `prefect server start` on a free loopback port,
with a temporary PREFECT_HOME), driven from the Prefect UI in headless Chromium and by the
`dataset.version.created` event; `prefect deploy --all` onto a process work pool; the
terminal progress bar of `dataset-prune run` in a pseudo-terminal, publishing to DVC."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import HANG, clean_env, read_until, write_npz
from deltalake import DeltaTable

from pruning_core.data import load_dataset
from pruning_core.versions import commit_version, list_versions

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def stop(proc: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM the process we started (it stops its own server and runs), then kill whatever of
    its process tree is left, by pid: its session, and descendants in sessions of their own."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started (start_new_session=True)
    except ProcessLookupError:
        pass
    proc.wait()
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@dataclass
class Served:
    ui: str
    api: str
    target: Path
    tmp: Path
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=30)

    def deployment(self, name: str) -> dict:
        with self.client() as c:
            found = [d for d in c.post("/deployments/filter", json={}).json() if d["name"] == name]
        assert len(found) == 1, f"deployment {name} not served"
        return found[0]

    def runs_of(self, deployment_id: str) -> list[dict]:
        with self.client() as c:
            runs = c.post("/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}).json()
        return [r for r in runs if not r.get("auto_scheduled")]  # not the nightly schedule's future runs

    def wait_for_run(self, run_id: str, timeout: float = 420) -> dict:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                run = c.get(f"/flow_runs/{run_id}").json()
                if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    return run
                if time.monotonic() > deadline:
                    pytest.fail(f"flow run {run_id} still {run['state_type']} after {timeout:.0f} s; "
                                f"serve log:\n{self.log.read_text()[-4000:]}")
                time.sleep(1)


@pytest.fixture(scope="module")
def tiny_npz(fmnist, tmp_path_factory) -> str:
    """800 training and 200 test samples of Fashion-MNIST: each served run trains in seconds."""
    return write_npz(fmnist, tmp_path_factory.mktemp("tiny") / "fmnist-tiny.npz", 800, 200)


@pytest.fixture(scope="module")
def served(tiny_npz, tmp_path_factory):
    """`deployments/serve.py` as `make serve` runs it (no PREFECT_API_URL: it starts its own
    server), on a free port, with tiny data and a temporary target; stopped afterwards."""
    tmp = tmp_path_factory.mktemp("served")
    target, log = tmp / "table", tmp / "serve.log"
    argv = [sys.executable, str(ROOT / "deployments" / "serve.py"), "--port", "0", "--limit", "1",
            "--set", f"dataset=npz:{tiny_npz}", "--set", "epochs=1", "--set", "shards=2", "--set", "workers=1",
            "--set", "block_size=256", "--set", f"out={tmp / 'runs'}", "--set", f"target={target}"]
    with open(log, "w") as sink:
        proc = subprocess.Popen(argv, env=clean_env(tmp / "home", PREFECT_RUNNER_POLL_FREQUENCY="2"), stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    try:
        deadline = time.monotonic() + 240
        while "being served" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve.py did not start (status {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        ui = re.search(r"Prefect UI: (http://127\.0\.0\.1:\d+)", log.read_text()).group(1)
        yield Served(ui=ui, api=f"{ui}/api", target=target, tmp=tmp, log=log)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test installs it)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = chromium.new_context(viewport={"width": 1400, "height": 1000})
            # Waits, not assertions on speed: on a loaded 2-core machine the UI can take a minute to settle.
            context.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)
            yield context
        finally:
            chromium.close()


def form_field(page, label: str):
    """A field of the UI's parameter form, found by its label."""
    return page.locator("span.schema-form-property__label", has_text=label).locator(
        "xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')][1]")


def run_from_ui(page, prepare, served: Served, deployment_id: str, known: set[str], shot: Path) -> str:
    """Do `prepare(page)` (the clicks up to the one that should create a run of the deployment),
    click the button it returns, and return the run that click's own request created: the
    browser's response to it is awaited (no polling), and it must be the one run of the deployment
    added since `known` was listed. The click is repeated only where the API answered 503 and
    created nothing: the server's "Service Unavailable" while its database is busy, which
    Prefect's own client retries too (a CI run on the loaded machine got one). Generous: on a
    loaded 2-core machine the UI's request can take a minute to reach the API. A failure names
    what the page showed, the requests that failed and the browser's console errors, and keeps a
    screenshot."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    problems = []
    page.on("response",
            lambda r: problems.append(f"HTTP {r.status} {r.request.method} {r.url}") if r.status >= 400 else None)
    page.on("requestfailed", lambda r: problems.append(f"failed {r.method} {r.url}: {r.failure}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text[:200]}") if m.type == "error" else None)
    submit = prepare(page)
    for _ in range(3):
        try:
            with page.expect_response(lambda r: r.request.method == "POST" and
                                      r.url.endswith(f"/deployments/{deployment_id}/create_flow_run"),
                                      timeout=240_000) as created:
                submit.click()
        except PlaywrightTimeout:
            page.screenshot(path=str(shot), full_page=True)
            shown = " | ".join(page.locator("body").inner_text().splitlines()[-8:])
            pytest.fail(f"the click asked for no run of {deployment_id} within 240 s ({shot}) at {page.url}: "
                        f"{shown}; {problems or 'no failed request'}")
        response = created.value
        if response.status != 503:
            break
        assert not {r["id"] for r in served.runs_of(deployment_id)} - known, "a 503 created a run"
    assert response.ok, (response.status, response.text()[:500], problems)
    run_id = response.json()["id"]
    assert {r["id"] for r in served.runs_of(deployment_id)} - known == {run_id}, "one click made one run"
    return run_id


def version_summaries(target: Path) -> list[tuple]:
    """(prune_ratio, source, rows) of every version of the table, by the rows really stored."""
    out = []
    for row in list_versions(str(target)):
        rows = DeltaTable(str(target), version=row["version"]).to_pyarrow_table().num_rows
        p = row["provenance"]
        out.append((p["prune_ratio"], p["source"]["name"], rows))
    return sorted(out)


def test_ui_quick_run_and_custom_run_complete_and_publish_versions(served, browser, tiny_npz, tmp_path):
    from playwright.sync_api import expect

    nightly = served.deployment("nightly")
    deployment_page = f"{served.ui}/deployments/deployment/{nightly['id']}"
    page = browser.new_page()
    page.goto(deployment_page)
    expect(page.get_by_text("At 02:00 AM every day")).to_be_visible()  # the cron schedule, in the UI
    assert served.runs_of(nightly["id"]) == []

    def quick_run(page):  # the clicks before the one that creates the run, which run_from_ui makes
        page.goto(deployment_page)
        page.wait_for_load_state("networkidle")  # the page's own requests done before the first click
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Quick run", exact=True).click()
        confirm = page.locator("#p-modal-teleport-target").get_by_role("button", name="Run", exact=True)
        expect(confirm).to_be_enabled()
        page.wait_for_load_state("networkidle")
        return confirm

    def custom_run(page):
        page.goto(deployment_page)
        page.wait_for_load_state("networkidle")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        page.wait_for_url("**/run**")
        ratio = form_field(page, "Prune ratio (fraction removed)").locator("input")
        expect(ratio).to_have_value("0.4")
        ratio.fill("0.25")
        page.wait_for_load_state("networkidle")
        return page.get_by_role("button", name="Submit")

    quick = run_from_ui(page, quick_run, served, nightly["id"], set(), tmp_path / "quick-run.png")
    custom = run_from_ui(page, custom_run, served, nightly["id"], {quick}, tmp_path / "custom-run.png")

    runs = [served.wait_for_run(run_id) for run_id in (quick, custom)]
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], served.log.read_text()[-4000:]
    assert [r["parameters"]["params"]["prune_ratio"] for r in runs] == [0.4, 0.25]
    source = f"npz:{Path(tiny_npz).resolve()}"
    assert version_summaries(served.target) == [(0.25, source, 600), (0.4, source, 480)]

    with served.client() as c:  # each run's progress artifact reached 100 %
        for run_id in (quick, custom):
            found = c.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]},
                                                                     "type": {"any_": ["progress"]}}}).json()
            assert [a["data"] for a in found] == [100.0]

    page.goto(f"{served.ui}/runs/flow-run/{custom}")
    expect(page.get_by_text("Completed").first).to_be_visible()
    expect(page.get_by_text("prune-dataset").first).to_be_visible()
    page.wait_for_load_state("networkidle")
    shot = tmp_path / "completed-run.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    with served.client() as c:  # the run's summary shows its pictures in the UI
        (summary,) = c.post("/artifacts/filter", json={"artifacts": {
            "flow_run_id": {"any_": [custom]}, "key": {"any_": ["dataset-pruning-summary"]}}}).json()
    page.goto(f"{served.ui}/artifacts/artifact/{summary['id']}")
    pictures = page.locator("img[src^='data:image/png']")
    expect(pictures.first).to_be_visible()
    widths = pictures.evaluate_all("images => images.map(image => image.complete ? image.naturalWidth : 0)")
    assert len(widths) == 3 and min(widths) > 500, widths  # selection, examples, mislabelled
    page.close()


def test_invalid_parameters_are_rejected_before_a_run_starts(served, browser):
    from playwright.sync_api import expect

    nightly = served.deployment("nightly")
    before = len(served.runs_of(nightly["id"]))
    page = browser.new_page()
    page.goto(f"{served.ui}/deployments/deployment/{nightly['id']}/run")
    field = form_field(page, "Prune ratio (fraction removed)")
    field.locator("input").fill("1.5")
    page.get_by_role("button", name="Submit").click()
    expect(field.get_by_text("is not valid")).to_be_visible()  # the form's schema check, bounds from pydantic
    assert "/run" in page.url
    page.close()

    with served.client() as c:  # the server enforces the same schema on the API
        params = {**nightly["parameters"]["params"], "dataset": "imagenet"}
        response = c.post(f"/deployments/{nightly['id']}/create_flow_run", json={"parameters": {"params": params}})
        assert response.status_code == 409 and "imagenet" in response.text, response.text
    assert len(served.runs_of(nightly["id"])) == before


def test_source_version_event_starts_the_triggered_deployment(served, tiny_npz):
    trigger = next(d for d in SPEC["deployments"] if d.get("triggers"))
    resource = trigger["triggers"][0]["match"]["prefect.resource.id"]  # dataset.<source table name>
    raw = served.tmp / resource.removeprefix("dataset.")
    ds = load_dataset(f"npz:{tiny_npz}")  # new raw data lands: a version of the source table
    version = commit_version(str(raw), ds, np.ones(ds.n, bool), {"run_id": "ingest-1", "n_kept": ds.n,
                                                                 "source": {"name": ds.name, "n": ds.n}})
    deployment = served.deployment(trigger["name"])
    assert served.runs_of(deployment["id"]) == []

    subprocess.run([str(BIN / "prefect"), "event", "emit", "dataset.version.created", "--resource-id", resource,
                    "--payload", json.dumps({"uri": str(raw), "version": version, "run_id": "ingest-1",
                                             "n_kept": ds.n})],
                   env=clean_env(served.tmp / "client", PREFECT_API_URL=served.api), check=True, capture_output=True)
    deadline = time.monotonic() + 180
    while not (runs := served.runs_of(deployment["id"])):
        if time.monotonic() > deadline:
            pytest.fail(f"the event started no run of {trigger['name']}; serve log:\n{served.log.read_text()[-3000:]}")
        time.sleep(1)
    run = served.wait_for_run(runs[0]["id"])
    assert run["state_type"] == "COMPLETED", served.log.read_text()[-4000:]
    assert (run["parameters"]["uri"], run["parameters"]["version"]) == (str(raw), version)
    assert (0.4, f"delta:{raw}@{version}", 480) in version_summaries(served.target)


def test_prefect_deployment_ls_shows_every_served_deployment(served):
    result = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], capture_output=True, text=True, check=True,
                            env=clean_env(served.tmp / "client", PREFECT_API_URL=served.api))
    for item in SPEC["deployments"]:
        assert item["name"] in result.stdout, result.stdout


def test_prefect_deploy_all_onto_a_process_work_pool(prefect_api, tmp_path):
    env = clean_env(tmp_path / "home", PREFECT_API_URL=prefect_api)
    pools = {d["work_pool"]["name"] for d in SPEC["deployments"]}
    for pool in pools:
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite"],
                       env=env, check=True, capture_output=True)
    result = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=ROOT / "deployments",
                            env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    listing = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], env=env, capture_output=True, text=True,
                             check=True).stdout
    with httpx.Client(base_url=prefect_api, timeout=30) as c:
        deployed = {d["name"]: d for d in c.post("/deployments/filter", json={}).json()}
        automations = c.post("/automations/filter", json={}).json()
    for item in SPEC["deployments"]:
        assert item["name"] in listing
        d = deployed[item["name"]]
        assert d["work_pool_name"] == item["work_pool"]["name"] and d["entrypoint"] == item["entrypoint"]
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert [s["schedule"]["cron"] for s in d["schedules"]] == [s["cron"] for s in item.get("schedules", [])]
    triggered = [a for a in automations if a["trigger"].get("match", {}).get("prefect.resource.id")
                 in {t["match"]["prefect.resource.id"] for d in SPEC["deployments"] for t in d.get("triggers", [])}]
    assert triggered and all(a["trigger"]["expect"] == ["dataset.version.created"] for a in triggered)


def test_run_shows_a_progress_bar_and_publishes_to_dvc(prefect_api, tiny_npz, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    argv = [str(BIN / "dataset-prune"), "run", "--dataset", f"npz:{tiny_npz}", "--epochs", "1", "--prune-ratio",
            "0.3", "--shards", "2", "--workers", "1", "--block-size", "256", "--out", str(tmp_path / "runs"),
            "--target", f"dvc:{repo}#fmnist-small-pruned"]
    main_fd, child_fd = pty.openpty()  # a terminal, so the bar is drawn
    proc = subprocess.Popen(argv, stdin=child_fd, stdout=child_fd, stderr=child_fd, start_new_session=True,
                            env={**clean_env(tmp_path / "home", PREFECT_API_URL=prefect_api), "COLUMNS": "120"})
    os.close(child_fd)
    try:
        text = ANSI.sub("", read_until(main_fd))
        code = proc.wait(timeout=HANG)
    finally:
        os.close(main_fd)
        stop(proc, grace=10)
    assert code == 0, text[-4000:]
    for step in ("features 2/2", "inverse 1/1", "influence 2/2", "selection 3/3", "publish 1/1"):
        assert step in text, step
    assert re.search(r"━+\s+100%", text), [text[m.start() - 200:m.end() + 50] for m in re.finditer("100%", text)][-2:]

    run_dir = Path(re.search(r"run folder:\s+(\S+)", text).group(1))
    assert f"pictures:      {run_dir}/selection.png, {run_dir}/examples.png, {run_dir}/mislabelled.png" in text
    assert re.search(r"mislabelled:   \d+ samples look mislabelled", text)
    selection = pq.read_table(run_dir / "selection.parquet")
    kept = selection.column("sample_id").to_numpy()[~selection.column("pruned").to_numpy(zero_copy_only=False)]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["version"] == {"uri": f"dvc:{repo}#fmnist-small-pruned", "version": 0}
    tags = subprocess.run(["git", "tag", "--list"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    assert tags == ["fmnist-small-pruned-v0"]
    stored = pq.read_table(repo / "fmnist-small-pruned" / "samples.parquet")
    assert sorted(stored.column("sample_id").to_pylist()) == kept.tolist() and len(kept) == 560


def serve_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_entry", ROOT / "deployments" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--set", "colour=blue"], "--set colour: not a field of RunParameters"),
    (["--set", "prune_ratio=1.5"], "deployment nightly: prune_ratio: Input should be less than 1"),
    (["--set", "model=vit"], "deployment nightly: model: Input should be linear, cnn, resnet18, resnet8, "),
    (["--set", "noequals"], "--set 'noequals': expected KEY=VALUE"),
    (["--only", "weekly"], "--only weekly: no such deployment; valid: nightly, evaluation, on-new-source-version"),
    (["--port", "many"], "argument --port: invalid int value"),
])
def test_serve_refuses_bad_input_before_starting_anything(argv, message, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    serve = serve_module()
    with pytest.raises(serve.BadServeInput, match=re.escape(message)):
        serve.prepare(["--port", "0", *argv])


def test_serve_bad_input_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "deployments" / "serve.py"), "--set", "epochs=0"],
                            env=clean_env(tmp_path / "home"), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "serve.py: error: deployment nightly: epochs: Input should be greater than or equal to 1"]
    assert not list((tmp_path / "home").rglob("*.db"))  # no server was started: no database
