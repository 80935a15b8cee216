"""Recipe files are data, not code (issue 17: N1, N2, N8, N12, N14): what a recipe file may not set is refused at
``plan`` and by ``run``'s up-front checks with one line naming the key, exit 2, and the command it would have run
never runs. The same settings typed on the command line still plan, and ``plan`` shows them (env names only).

Each attack writes a marker file when it succeeds; every test asserts the marker is absent."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from alignctl.cli import main
from alignctl.config import recipe_files, redact
from alignctl.config.model_checks import pkg_dir
from conftest import run_cli

BASE = "name: r\nmodel: {name_or_path: 'tiny:llama'}\nstages: {sft: {trainer: sft, data: sft, max_steps: 1}}\n"


def problem_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("  - ")]


def refused(capsys, command: str, *args: str) -> str:
    """``alignctl <command> ...`` in-process: exit 2, one problem line, no traceback; returns that line."""
    rc = main([command, *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = problem_lines(err)
    assert len(lines) == 1, err
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def sitecustomize(folder: Path, marker: Path) -> Path:
    """A folder that, on PYTHONPATH, makes every Python process touch ``marker``."""
    write(folder / "sitecustomize.py", f"open({str(marker)!r}, 'w').close()\n")
    return folder


def attacks(tmp_path: Path) -> dict[str, str]:
    """Recipe-file launcher settings that run a command (each touches tmp/PWNED), by the key that is refused."""
    marker = tmp_path / "PWNED"
    site = sitecustomize(tmp_path / "site", marker)
    acc = write(tmp_path / "acc.yaml", "distributed_type: MULTI_CPU\nnum_processes: 1\n")
    return {
        "launcher.prefix": "launcher: {kind: torchrun, nproc_per_node: 1, prefix: [sh, -c, "
                           f"'touch {marker}; exec \"$@\"', sh]}}",
        "launcher.env": f"launcher: {{kind: torchrun, nproc_per_node: 1, env: {{PYTHONPATH: {site}}}}}",
        "launcher.extra_args": "launcher: {kind: torchrun, nproc_per_node: 1, extra_args: [--no-python]}",
        "launcher.config_file": f"launcher: {{kind: accelerate, num_processes: 1, config_file: {acc}}}",
    }


def test_recipe_prefix_refused_by_the_real_cli(tmp_path):
    """The real CLI: `plan recipe=./r.yaml` with a command in launcher.prefix: exit 2, one line naming the key."""
    write(tmp_path / "r.yaml", BASE + attacks(tmp_path)["launcher.prefix"] + "\n")
    proc = run_cli(["plan", "recipe=./r.yaml", f"output_root={tmp_path}/out"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    lines = problem_lines(proc.stderr)
    assert len(lines) == 1 and "launcher.prefix" in lines[0] and "r.yaml" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("key", ["launcher.prefix", "launcher.env", "launcher.extra_args", "launcher.config_file"])
def test_recipe_launch_settings_refused_by_plan_and_run(key, capsys, tmp_path):
    r = write(tmp_path / "r.yaml", BASE + attacks(tmp_path)[key] + "\n")
    line = refused(capsys, "plan", f"recipe={r}", f"output_root={tmp_path}/out")
    assert key in line and str(r) in line and "command line" in line, line
    run_dir = tmp_path / "run"
    line = refused(capsys, "run", f"recipe={r}", f"output_root={tmp_path}/out", f"hydra.run.dir={run_dir}")
    assert key in line, line
    assert not (tmp_path / "PWNED").exists() and not run_dir.exists() and not (tmp_path / "out").exists()


def test_shipped_accelerate_config_by_name_is_allowed_in_a_recipe(capsys, tmp_path):
    r = write(tmp_path / "r.yaml", BASE + "launcher: {kind: accelerate, num_processes: 1, config_file: zero2, "
                                          "prefix: [], extra_args: [], env: {}}\n")
    assert main(["plan", f"recipe={r}", f"output_root={tmp_path}/out"]) == 0, capsys.readouterr().err
    assert "config zero2.yaml" in capsys.readouterr().out


def test_launch_settings_on_the_command_line_plan_and_are_shown(capsys, tmp_path):
    """Typed by the user they are allowed, and plan shows them with their source; env values never appear."""
    marker = tmp_path / "PWNED"
    rc = main(["plan", f"output_root={tmp_path}/out", "launcher=torchrun", "launcher.nproc_per_node=1",
               f"launcher.prefix=[sh,-c,'touch {marker}; exec \"$@\"',sh]", "launcher.extra_args=['--max-restarts=0']",
               "+launcher.env.HF_TOKEN=hf_" + "s" * 30, "+launcher.env.NCCL_DEBUG=WARN",
               "+launcher.env.DB_PASS=hunter2", f"store={tmp_path}/st"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    text = " ".join(out.out.split())
    assert f"prefix sh -c touch {marker}; exec \"$@\" sh (command line)" in text, text
    assert "extra_args --max-restarts=0 (command line)" in text, text
    assert "env DB_PASS, HF_TOKEN, NCCL_DEBUG (names; values not shown) (command line)" in text, text
    assert "hf_sss" not in text and "hunter2" not in text and "WARN" not in text
    assert f"store {tmp_path}/st (command line)" in text and f"output_root {tmp_path}/out (command line)" in text
    assert not marker.exists()


def test_plan_shows_the_default_store_and_redacts_secrets_in_prefix_words(capsys, tmp_path):
    assert main(["plan", f"output_root={tmp_path}/out", "launcher=torchrun", "launcher.nproc_per_node=1",
                 "launcher.prefix=[srun,'--export=ALL,HF_TOKEN=hf_" + "c" * 30 + "']"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "prefix srun --export=ALL,HF_TOKEN=*** (command line)" in text and "hf_ccc" not in text, text
    assert f"store {tmp_path}/out/.store (default: <output_root>/.store)" in text, text


# -- N2: defaults may name only options of alignctl's groups --------------------------------------------------------
EVIL = "# @package _global_\nhydra: {{callbacks: {{x: {{_target_: builtins.open, _args_: [{marker}, w]}}}}}}\n"


@pytest.mark.parametrize("entry,needle", [
    ("{override /model: ../../../../../../../../../../../../proc/self/cwd/pack/evil}", "is not one of the model"),
    ("{override /model: ../pack/evil}", "is not one of the model options"),
    ("'/proc/self/cwd/pack/evil'", "chooses 'proc'"),
    ("{/model@_global_: tiny}", "names a package ('@')"),
    ("{override /model@_global_: tiny}", "names a package ('@')"),
], ids=["proc-self-cwd", "relative-dotdot", "config-path", "package-global", "override-package"])
def test_defaults_outside_alignctl_groups_are_refused(entry, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    write(tmp_path / "pack" / "evil.yaml", EVIL.format(marker=marker))
    r = write(tmp_path / "pack" / "r.yaml", f"defaults: [{entry}]\n" + BASE)
    line = refused(capsys, "plan", f"recipe={r}", f"output_root={tmp_path}/out")
    assert "defaults entry" in line and needle in line, line
    refused(capsys, "run", f"recipe={r}", f"output_root={tmp_path}/out", f"hydra.run.dir={tmp_path}/run")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_defaults_may_name_an_option_of_the_users_config_dir(capsys, tmp_path):
    cd = tmp_path / "cd"
    write(cd / "model" / "mine.yaml", "name_or_path: 'tiny:qwen2'\n")
    r = write(tmp_path / "r.yaml", "defaults: [{override /model: mine}]\nname: r\n"
                                   "stages: {sft: {trainer: sft, data: sft, max_steps: 1}}\n")
    line = refused(capsys, "plan", f"recipe={r}", f"output_root={tmp_path}/out")
    assert "'mine' is not one of the model options" in line, line
    assert main(["plan", "--config-dir", str(cd), f"recipe={r}", f"output_root={tmp_path}/out"]) == 0
    assert "model tiny:qwen2" in capsys.readouterr().out


@pytest.fixture
def sneaky_model_option(tmp_path):
    """A model option whose file alignctl never checked and which sets hydra.callbacks (as the defaults traversal
    did): the composed configuration itself must be refused."""
    from hydra.core.config_store import ConfigStore

    marker = tmp_path / "PWNED"
    cs = ConfigStore.instance()
    name = f"sneaky{uuid.uuid4().hex[:8]}"
    cs.store(group="model", name=name, package="_global_",
             node={"model": {"name_or_path": "tiny:llama"},
                   "hydra": {"callbacks": {"x": {"_target_": "builtins.open", "_args_": [str(marker), "w"]}}}})
    yield name, marker
    cs.repo["model"].pop(f"{name}.yaml", None)


def test_composed_hydra_callbacks_are_refused(sneaky_model_option, capsys, tmp_path):
    name, marker = sneaky_model_option
    line = refused(capsys, "plan", f"model={name}", f"output_root={tmp_path}/out")
    assert "hydra.callbacks" in line and "command line" in line and "--config-dir" in line, line
    refused(capsys, "run", f"model={name}", f"output_root={tmp_path}/out", f"hydra.run.dir={tmp_path}/run")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_hydra_callbacks_typed_on_the_command_line_are_the_users(capsys, tmp_path):
    assert main(["plan", f"output_root={tmp_path}/out", "+hydra.callbacks.x={_target_: builtins.print}"]) == 0


# -- N8: a recipe does not choose the store, remote code or a run folder outside output_root ------------------------
@pytest.mark.parametrize("extra,needle", [
    ("store: ./pack/store\n", "sets store"),
    ("model: {trust_remote_code: true}\n", "sets model.trust_remote_code"),
    ("model: {trust_remote_code: '${stages.sft.packing}'}\n", "sets model.trust_remote_code"),
    ("hydra: {run: {dir: /tmp/finished-run}}\n", "does not start with ${output_root}/"),
    ("hydra: {run: {dir: '${output_root}/../finished'}}\n", "contains '..'"),
    ("hydra: {run: {dir: '${output_root}/${description}'}}\n", "interpolates description"),
    ("hydra: {sweep: {dir: '${output_root}/${now:../%Y}'}}\n", "contains '..'"),
    ("hydra: {sweep: {subdir: /abs}}\n", "is an absolute path"),
], ids=["store", "remote-code", "remote-code-interpolated", "run-dir-absolute", "run-dir-dotdot",
        "run-dir-interpolates-a-recipe-value", "sweep-dir-now-dotdot", "sweep-subdir-absolute"])
def test_recipe_cannot_choose_store_remote_code_or_foreign_run_dir(extra, needle, capsys, tmp_path):
    text = BASE.replace("stages: {sft: {trainer: sft, data: sft, max_steps: 1}}",
                        "stages: {sft: {trainer: sft, data: sft, max_steps: 1, packing: true}}")
    if extra.startswith("model:"):
        text = text.replace("model: {name_or_path: 'tiny:llama'}\n", "")
        extra = extra.replace("{", "{name_or_path: 'tiny:llama', ", 1)
    r = write(tmp_path / "r.yaml", text + extra)
    line = refused(capsys, "plan", f"recipe={r}", f"output_root={tmp_path}/out")
    assert needle in line, line


def test_recipe_run_dir_under_output_root_plans(capsys, tmp_path):
    r = write(tmp_path / "r.yaml", BASE + "hydra: {run: {dir: '${output_root}/${name}/mine-${now:%Y}'}, "
                                          "sweep: {dir: '${output_root}/sweeps', subdir: 'job-${hydra.job.num}'}}\n")
    assert main(["plan", f"recipe={r}", f"output_root={tmp_path}/out"]) == 0
    assert f"{tmp_path}/out/r/mine-" in " ".join(capsys.readouterr().out.split())


def test_link_consent_in_a_recipe_is_refused_even_inside_a_rounds_block():
    node = {"stages": {"it": {"rounds": 2, "gen": {"trainer": "generate", "trust_remote_code_links": ["judge"]},
                              "dpo": {"trainer": "dpo"}},
                       "ppo": {"trainer": "ppo", "trust_remote_code_links": ["reward"]}}}
    problems = recipe_files.recipe_file_problems(node, Path("r.yaml"), {"stages"}, set())
    assert [p.split(": sets ")[1].split(",")[0] for p in problems] == ["stages.it.gen.trust_remote_code_links",
                                                                      "stages.ppo.trust_remote_code_links"]


def test_a_recipe_file_lists_principles_inline_and_only_the_command_line_names_a_file(capsys, tmp_path):
    """A principles file is read as text, shown by plan and fed to the models: a recipe file naming one could read any
    file on disk (tried: /etc/passwd was printed as principles), so only the user names one."""
    stages = ("stages: {sft: {trainer: sft, data: sft, max_steps: 1}, cai: {trainer: critique, from: sft, "
              "data: prompts, principles: %s}}")
    base = BASE.replace("stages: {sft: {trainer: sft, data: sft, max_steps: 1}}", stages)
    line = refused(capsys, "plan", f"recipe={write(tmp_path / 'r.yaml', base % '/etc/passwd')}",
                   f"output_root={tmp_path}/out")
    assert "stages.cai.principles names a file ('/etc/passwd')" in line and "on the command line" in line
    assert "root:" not in line
    own = write(tmp_path / "mine.txt", "be kind\n")
    assert main(["plan", f"recipe={write(tmp_path / 'ok.yaml', base % '[be warm]')}", f"output_root={tmp_path}/out",
                 f"stages.cai.principles={own}"]) == 0
    assert "principles be kind" in capsys.readouterr().out


# -- output_root that cannot be created ------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_root_under_proc_is_one_clean_line(capsys, tmp_path):
    line = refused(capsys, "plan", "output_root=/proc/alignctl-out")
    assert line.startswith("  - output_root: /proc/alignctl-out") and "choose another folder" in line, line
    proc = run_cli(["run", "output_root=/proc/alignctl-out"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "internal error" not in proc.stderr, proc.stderr
    lines = problem_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("  - output_root: /proc/alignctl-out"), proc.stderr


# -- N12: pkg: names are located, never imported ---------------------------------------------------------------------
def test_dotted_pkg_name_is_refused_and_never_imported(capsys, tmp_path, monkeypatch):
    name = f"trustpkg_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "IMPORTED"
    write(tmp_path / "lib" / name / "__init__.py", f"open({str(marker)!r}, 'w').close()\n")
    write(tmp_path / "lib" / name / "sub" / "__init__.py", "")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    assert pkg_dir(f"pkg:{name}.sub") is None
    assert pkg_dir(f"pkg:{name}/sub") == tmp_path / "lib" / name / "sub"  # a folder inside it: located
    line = refused(capsys, "plan", f"model.name_or_path=pkg:{name}.sub", f"output_root={tmp_path}/out")
    assert f"'pkg:{name}.sub' must be pkg:<package>" in line and "no dots" in line, line
    assert name not in sys.modules and not marker.exists()


# -- N14: secrets -----------------------------------------------------------------------------------------------------
def test_redaction_of_pass_tokens_and_connection_strings():
    conn = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0+a2V5==;EndpointSuffix=core.windows.net"
    sas = "BlobEndpoint=https://a.blob.core.windows.net/;SharedAccessSignature=sv=2022-11-02&ss=b&sig=AbC%2Fx"
    out = redact.redact({"launcher": {"env": {"DB_PASS": "hunter2", "GH_TOKENS": "t1,t2", "OMP_NUM_THREADS": "4",
                                              "AZURE_STORAGE_CONNECTION_STRING": conn}},
                         "model": {"additional_special_tokens": ["<a>"]},
                         "stages": {"sft": {"max_new_tokens": 8, "run_name": f"x {conn}"}}, "description": sas})
    env = out["launcher"]["env"]
    assert env == {"DB_PASS": "***", "GH_TOKENS": "***", "OMP_NUM_THREADS": "4",
                   "AZURE_STORAGE_CONNECTION_STRING": "***"}
    assert out["model"]["additional_special_tokens"] == ["<a>"] and out["stages"]["sft"]["max_new_tokens"] == 8
    assert out["stages"]["sft"]["run_name"] == "x " + conn.replace("c2VjcmV0+a2V5==", "***")
    assert "sig=" not in out["description"].replace("SharedAccessSignature=***", "") and "AbC" not in out["description"]
    assert redact.redact(["launcher.env.DB_PASS=hunter2", "+launcher.env.API_TOKENS=abc"]) == [
        "launcher.env.DB_PASS=***", "+launcher.env.API_TOKENS=***"]
    assert redact.redact_text("AccountKey\\=abc\\=\\=;x") == "AccountKey\\=***;x"  # as Hydra escapes a job override
    assert not redact.secret_key("max_new_tokens") and not redact.secret_key("bypass")


def test_sweep_with_a_secret_override_warns_once(capsys, tmp_path):
    rc = main(["run", "-m", f"output_root={tmp_path}/out", f"hydra.sweep.dir={tmp_path}/sweep",
               "+stages.sft.run_name=https://me:s3cret@tracker.example/x", "stages.dpo.beta=0.1,abc"])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "sweep").exists(), err
    warnings = [line for line in err.splitlines() if line.startswith("alignctl: warning:")]
    assert len(warnings) == 1 and "stages.sft.run_name" in warnings[0] and "export" in warnings[0], err
    assert "s3cret" not in warnings[0]
