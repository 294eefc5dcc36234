"""Issue 14: every setting is checked before any work, and a run is written by one process only.

Every key of both scripts has a declared range; every value outside it stops the script in
parse_config with ONE line naming the key (exit code 2, no traceback), at once, before a file is
written. Config files are parsed, never run. Two processes never write the same run, and sampling
gives the same images whatever its batch size."""

import glob
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import configurator
import distributed
import sample_diffusion as sd
import train_diffusion as td

SCRIPTS = {"train_diffusion": td, "sample_diffusion": sd}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "config", "*.py")))

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread on a shared 2-core machine


# ----- the declared ranges, read independently
# The notation (configurator.py): "[lo, hi]" / "(lo, hi)" intervals of finite numbers, "N+ of [lo, hi]" tuples of at
# least N integers in the interval, a tuple of strings the choices, "text", "nonempty", "bool".

INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])$")
TUPLE_SPEC = re.compile(r"^(\d+)\+ of (.+)$")


def in_interval(value, spec):
    m = INTERVAL.match(spec)
    assert m, f"not an interval: {spec!r}"
    lo, hi = float(m.group(2)), float(m.group(3))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    above = value > lo if m.group(1) == "(" else value >= lo
    below = value < hi if m.group(4) == ")" else value <= hi
    return above and below


def expected_valid(value, spec):
    """Is `value` in the declared range `spec`? Written from the notation, not from configurator.is_valid."""
    if isinstance(spec, tuple):
        assert spec and all(isinstance(c, str) for c in spec), spec
        return isinstance(value, str) and value in spec
    if spec == "bool":
        return isinstance(value, bool)
    if spec == "text":
        return isinstance(value, str)
    if spec == "nonempty":
        return isinstance(value, str) and value.strip() != ""
    m = TUPLE_SPEC.match(spec)
    if m:
        return (
            isinstance(value, tuple)
            and len(value) >= int(m.group(1))
            and all(isinstance(v, int) and in_interval(v, m.group(2)) for v in value)
        )
    return in_interval(value, spec)


def candidates(default):
    """The classes of bad values for a key of this type: (text on the command line, the value it parses to)."""
    if isinstance(default, bool):
        return []  # true/false parse to valid values; "maybe" is a parse error (tested below)
    if isinstance(default, int):
        return [("0", 0), ("-1", -1), (str(10**15), 10**15)]
    if isinstance(default, float):
        return [
            ("nan", float("nan")),
            ("inf", math.inf),
            ("-inf", -math.inf),
            ("-1", -1.0),
            ("0", 0.0),
            ("1e300", 1e300),
        ]
    if isinstance(default, str):
        return [("", ""), ("no_such_choice", "no_such_choice")]
    if isinstance(default, tuple):
        return [("", ()), ("0", (0,)), ("-1", (-1,)), ("1000", (1000,))]
    raise AssertionError(f"a default of an unexpected type: {default!r}")


def bad_values(module, key):
    spec = module.RANGES[key]
    return [(text, value) for text, value in candidates(module.DEFAULTS[key]) if not expected_valid(value, spec)]


ALL_KEYS = [(name, key) for name, m in SCRIPTS.items() for key in m.DEFAULTS]


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so that no `except Exception` in the code under test hides it."""


def run_bounded(main, argv, seconds=10.0):
    """configurator.run_cli(main, argv) in this process: (exit code or None, seconds taken). A hang fails."""

    def on_alarm(signum, frame):
        raise Hang(f"{argv} still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    code = None
    try:
        configurator.run_cli(main, argv)
    except SystemExit as e:
        code = e.code
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return code, time.monotonic() - t0


def files_under(path):
    """Every file and folder below path (an empty or missing path: [])."""
    return sorted(os.path.join(d, n) for d, subdirs, files in os.walk(path) for n in subdirs + files)


def assert_refused_in_one_line(capsys, main, argv, tmp_path, must_name):
    """run_cli(main, argv) exits 2 within seconds with exactly one line `error: ...` naming `must_name`,
    and writes nothing: neither under tmp_path/out (the out_dir) nor in the working directory tmp_path/cwd."""
    capsys.readouterr()
    code, took = run_bounded(main, argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and must_name in lines[0], (argv, err)
    assert out == "", (argv, out)
    assert took < 10, (argv, took)
    assert not files_under(tmp_path / "out") and not files_under(tmp_path / "cwd"), (argv, files_under(tmp_path))
    return lines[0]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """tmp_path/cwd is the working directory (relative paths land there); tmp_path/out is the out_dir, not created."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


# ----- 1. every bad value: one line, at once, nothing written


def test_the_independent_reading_of_the_notation_agrees_with_is_valid():
    """The property test below trusts expected_valid; check it against is_valid on every candidate, good or bad,
    and on edge cases of each notation."""
    checked = 0
    for m in SCRIPTS.values():
        for key, spec in m.RANGES.items():
            for _, value in candidates(m.DEFAULTS[key]) + [(None, m.DEFAULTS[key])]:
                assert expected_valid(value, spec) == configurator.is_valid(value, spec), (key, spec, value)
                checked += 1
    edges = [
        (0, "(0, 1]", False),
        (1, "(0, 1]", True),
        (1e-9, "(0, 1]", True),
        (1, "[0, 1)", False),
        (0.0, "[0, 1)", True),
        (True, "[0, 1]", False),
        ("1", "[0, 1]", False),
        ((), "1+ of [1, 16]", False),
        ((), "0+ of [0, 15]", True),
        ((16, 1), "1+ of [1, 16]", True),
        ((17,), "1+ of [1, 16]", False),
        (" ", "nonempty", False),
        ("", "text", True),
        (0, "bool", False),
        ("v", ("v", "eps"), True),
        ("V", ("v", "eps"), False),
    ]
    for value, spec, ok in edges:
        assert expected_valid(value, spec) == ok and configurator.is_valid(value, spec) == ok, (value, spec, ok)
    assert checked > 200


@pytest.mark.parametrize("script, key", ALL_KEYS, ids=[f"{s}-{k}" for s, k in ALL_KEYS])
def test_every_bad_value_of_every_key_is_one_line_before_any_work(capsys, sandbox, script, key):
    m = SCRIPTS[script]
    spec = m.RANGES[key]
    bad = bad_values(m, key)
    if spec in ("text", "bool"):
        assert not bad, (key, spec, bad)
        return
    assert bad, f"{script}: no bad value found for {key} (range {spec!r}, default {m.DEFAULTS[key]!r})"
    out = sandbox / "out"
    for text, _ in bad:
        # the bad value comes last so that it also wins for --out_dir itself
        line = assert_refused_in_one_line(capsys, m.main, [f"--out_dir={out}", f"--{key}={text}"], sandbox, f"--{key}=")
        assert "out of range" in line, line


def test_bad_values_found_cover_the_types():
    """The property test above is not vacuous: it reaches every kind of key with several bad values."""
    total = {name: sum(len(bad_values(m, k)) for k in m.DEFAULTS) for name, m in SCRIPTS.items()}
    assert total["train_diffusion"] > 100 and total["sample_diffusion"] > 25, total
    assert [t for t, _ in bad_values(td, "channel_mults")] == ["", "0", "-1", "1000"]
    assert [t for t, _ in bad_values(td, "attention_levels")] == ["-1", "1000"]  # () and (0,) are valid
    assert [t for t, _ in bad_values(td, "lr")] == ["nan", "inf", "-inf", "-1", "0", "1e300"]
    assert [t for t, _ in bad_values(td, "min_lr")] == ["nan", "inf", "-inf", "-1", "1e300"]  # 0 is valid
    assert [t for t, _ in bad_values(td, "out_dir")] == [""]
    assert [t for t, _ in bad_values(sd, "device")] == ["", "no_such_choice"]
    assert bad_values(td, "resume") == [] and bad_values(sd, "checkpoint") == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bool_key_that_is_not_true_or_false_is_one_line(capsys, sandbox, script):
    m = SCRIPTS[script]
    bools = [k for k, v in m.DEFAULTS.items() if isinstance(v, bool)]
    assert bools
    for key in bools:
        line = assert_refused_in_one_line(
            capsys, m.main, [f"--out_dir={sandbox / 'out'}", f"--{key}=maybe"], sandbox, f"--{key}=maybe"
        )
        assert "expected true or false" in line, line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--min_lr=1e-3", "--lr=1e-4"], "--min_lr=0.001 is above --lr=0.0001"),
        (["--steps=2000"], "--steps=2000 is more than --num_timesteps=1000"),
        (["--channel_mults=1,2", "--attention_levels=2"], "--attention_levels=2: levels are 0..1"),
        (["--n_heads=3"], "do not divide into n_heads=3"),
        (["--base_channels=48"], "base_channels 48 must be a multiple of 32"),
        (["--image_size=18", "--channel_mults=1,2,2"], "--image_size"),
    ],
    ids=["min_lr>lr", "steps>T", "attention_level", "heads", "base_channels", "image_size"],
)
def test_settings_that_do_not_fit_together_are_one_line(capsys, sandbox, argv, expected):
    assert_refused_in_one_line(capsys, td.main, [f"--out_dir={sandbox / 'out'}", *argv], sandbox, expected)


def test_a_short_run_with_the_default_warmup_stays_legal(capsys):
    """warmup_steps above max_steps is a legal (if short) schedule: no check may refuse it."""
    for argv in (
        ["--max_steps=10"],
        [os.path.join(ROOT, "config", "pokemon_gpu.py"), "--max_steps=10"],
        [os.path.join(ROOT, "config", "shapes_cpu.py"), "--max_steps=10", "--warmup_steps=500"],
    ):
        C, explicit = td.configure(argv)
        assert C.max_steps == 10 and C.warmup_steps > C.max_steps and "max_steps" in explicit, (argv, vars(C))
    assert 0 < td.lr_at(0, C) <= C.lr and td.lr_at(9, C) <= C.lr


# ----- 2. every shipped key has a declared range, every default is in it


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_key_has_a_range_and_every_default_is_in_it(script):
    m = SCRIPTS[script]
    assert set(m.RANGES) == set(m.DEFAULTS), set(m.RANGES) ^ set(m.DEFAULTS)
    for key, default in m.DEFAULTS.items():
        assert configurator.is_valid(default, m.RANGES[key]) and expected_valid(default, m.RANGES[key]), (
            key,
            default,
            m.RANGES[key],
        )
    configurator.parse_config([], m.DEFAULTS, m.RANGES)  # the defaults pass the script's own check


def test_a_users_own_setting_without_a_range_is_type_checked_and_accepted(tmp_path):
    """sample_diffusion.py tells its users to edit its constants: one they add without a range is a
    setting like the others (--key=value, a config file, its type checked), not an AssertionError."""
    source = open(os.path.join(ROOT, "sample_diffusion.py"), encoding="utf-8").read()
    mine = '\nout_dir = "diffusion_results"\nmy_steps = 7  # the user\'s own constant\n'
    source = source.replace('\nout_dir = "diffusion_results"\n', mine)
    m = {"__name__": "users_sample_diffusion"}
    exec(compile(source, "sample_diffusion.py", "exec"), m)
    assert m["DEFAULTS"]["my_steps"] == 7 and "my_steps" not in m["RANGES"]
    C, explicit = configurator.parse_config(["--my_steps=12"], m["DEFAULTS"], m["RANGES"])
    assert C.my_steps == 12 and explicit == {"my_steps"}
    with pytest.raises(configurator.UserError, match="--my_steps=many: expected an integer"):
        configurator.parse_config(["--my_steps=many"], m["DEFAULTS"], m["RANGES"])
    (tmp_path / "mine.py").write_text("my_steps = 'many'\n")
    with pytest.raises(configurator.UserError, match="my_steps = 'many': expected an integer"):
        configurator.parse_config([str(tmp_path / "mine.py")], m["DEFAULTS"], m["RANGES"])


def test_every_value_of_every_config_file_is_in_range():
    assert len(CONFIG_FILES) >= 2, CONFIG_FILES
    for path in CONFIG_FILES:
        values = configurator.read_config_file(path, td.DEFAULTS)
        assert values, path
        for key, value in values.items():
            spec = td.RANGES[key]
            assert configurator.is_valid(value, spec) and expected_valid(value, spec), (path, key, value, spec)
        C, explicit = td.configure([path])  # and together they fit (consistency, U-Net layout)
        assert explicit == set(values)


# ----- 3. config files: parsed, never run


def write(path, text):
    path.write_text(text)
    return str(path)


def test_a_config_file_with_an_unknown_key_names_the_file_and_line(capsys, sandbox):
    path = write(sandbox / "bad.py", '"""doc"""\nlr = 1e-3\nnope = 1\n')
    line = assert_refused_in_one_line(
        capsys, td.main, [path, f"--out_dir={sandbox / 'out'}"], sandbox, f"{path} line 3"
    )
    assert "unknown key nope" in line, line


def test_a_config_file_value_of_the_wrong_type_is_one_line(capsys, sandbox):
    path = write(sandbox / "bad.py", 'batch_size = "big"\n')
    line = assert_refused_in_one_line(
        capsys, td.main, [path, f"--out_dir={sandbox / 'out'}"], sandbox, f"{path} line 1"
    )
    assert "batch_size = 'big': expected an integer" in line, line


@pytest.mark.parametrize(
    "text, line_no, expected",
    [
        ("lr = 1e-3 * 2\n", 1, "lr must be a literal"),
        ('batch_size = 4\nmax_steps = int(open({marker!r}, "w").write("ran"))\n', 2, "max_steps must be a literal"),
        ("import os\nos.system({touch!r})\n", 1, "only `key = value` assignments"),
        ("lr = 1e-3\n__import__('pathlib').Path({marker!r}).touch()\n", 2, "only `key = value` assignments"),
        ("lr, min_lr = 1e-3, 1e-4\n", 1, "only `key = value` assignments"),
    ],
    ids=["arithmetic", "call", "import", "statement", "tuple-target"],
)
def test_a_config_file_with_code_is_refused_without_running_it(capsys, sandbox, text, line_no, expected):
    marker = str(sandbox / "ran")
    path = write(sandbox / "code.py", text.format(marker=marker, touch=f"touch {marker}"))
    line = assert_refused_in_one_line(
        capsys, td.main, [path, f"--out_dir={sandbox / 'out'}"], sandbox, f"{path} line {line_no}"
    )
    assert expected in line, line
    assert not os.path.exists(marker), "the config file was run"


def test_a_config_file_after_an_override_is_refused(capsys, sandbox):
    path = write(sandbox / "ok.py", "lr = 1e-3\n")
    line = assert_refused_in_one_line(capsys, td.main, [f"--out_dir={sandbox / 'out'}", path], sandbox, path)
    assert "comes after a --key=value" in line, line


def test_a_config_file_layered_on_a_base_changes_only_what_it_names(sandbox):
    """`base = "other.py"` reads the other file first (relative to this one); this file's lines win."""
    write(sandbox / "first.py", 'dataset = "shapes"\nlr = 1e-3\nmax_steps = 50\n')
    (sandbox / "more").mkdir()
    path = write(sandbox / "more" / "second.py", '"""doc"""\nbase = "../first.py"\nlr = 5e-4\n')
    assert configurator.read_config_file(path, td.DEFAULTS) == dict(dataset="shapes", lr=5e-4, max_steps=50)
    C, explicit = td.configure([path])
    assert (C.dataset, C.lr, C.max_steps) == ("shapes", 5e-4, 50) and explicit == {"dataset", "lr", "max_steps"}
    shipped = os.path.join(ROOT, "config", "shapes_16px.py")
    recipe = configurator.read_config_file(os.path.join(ROOT, "config", "shapes_cpu.py"), td.DEFAULTS)
    layered = configurator.read_config_file(shipped, td.DEFAULTS)
    assert {k: v for k, v in layered.items() if recipe.get(k) != v} == dict(
        image_size=16, patch_size=1, sampler="ddim", steps=50, eta=1.0
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ('lr = 1e-3\nbase = "first.py"\n', "base must come first"),
        ("base = 3\n", "base must come first and name a config file"),
        ('base = "loop.py"\n', "is its own base"),
        ('base = "nowhere.py"\n', "nowhere.py does not exist"),
    ],
    ids=["not-first", "not-a-name", "loop", "missing"],
)
def test_a_bad_base_line_is_one_line(capsys, sandbox, text, expected):
    write(sandbox / "first.py", "lr = 1e-3\n")
    path = write(sandbox / "loop.py", text)
    line = assert_refused_in_one_line(capsys, td.main, [path, f"--out_dir={sandbox / 'out'}"], sandbox, expected)
    assert "loop.py" in line, line


def test_config_file_then_overrides(capsys):
    path = os.path.join(ROOT, "config", "shapes_cpu.py")
    from_file = configurator.read_config_file(path, td.DEFAULTS)
    assert from_file["max_steps"] != 1000 and from_file["batch_size"] != td.DEFAULTS["batch_size"]
    C, explicit = td.configure([path, "--max_steps=1000", "--seed=7"])
    assert C.max_steps == 1000 and C.seed == 7  # the overrides win
    for key, value in from_file.items():
        if key != "max_steps":
            assert getattr(C, key) == value, key  # the file's values are applied
    assert C.n_heads == td.DEFAULTS["n_heads"] and C.out_dir == td.DEFAULTS["out_dir"]  # the rest are the defaults
    assert explicit == set(from_file) | {"max_steps", "seed"}
    assert "no GPU and no config file" not in capsys.readouterr().err  # a config file replaces the CPU recipe


# ----- 4. one writer per run


def wait_until(condition, proc, timeout, what):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the first run ended early with code {proc.returncode} while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_second_process_cannot_write_a_run_in_use(root, tiny, tmp_path):
    out = tmp_path / "out"
    args = tiny + [
        "--max_steps=100000",
        "--ckpt_interval=2",
        "--eval_interval=100000",
        "--sample_interval=100000",
        "--wandb_mode=disabled",
        f"--out_dir={out}",
    ]
    with open(tmp_path / "first.err", "w") as first_err:
        first = subprocess.Popen(
            [sys.executable, "train_diffusion.py", *args],
            cwd=root,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=first_err,
        )
        try:
            # --resume=auto finds a run by its ckpt.pt: wait for the lock and the first checkpoint
            wait_until(
                lambda: glob.glob(str(out / "*" / "run.lock")) and glob.glob(str(out / "*" / "ckpt.pt")),
                first,
                400,
                "run.lock and ckpt.pt",
            )
            (lock,) = glob.glob(str(out / "*" / "run.lock"))
            run_dir = os.path.dirname(lock)
            assert open(lock).read().split() == [str(first.pid), socket.gethostname()]

            second = subprocess.run(
                [sys.executable, "train_diffusion.py", *args, "--resume=auto"],
                cwd=root,
                env=ENV,
                capture_output=True,
                text=True,
                timeout=150,
            )  # a second writer would train on
            assert second.returncode == 2, (second.returncode, second.stderr[-3000:])
            assert "Traceback" not in second.stderr, second.stderr
            errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1, second.stderr
            assert f"run {run_dir} is in use by process {first.pid} on {socket.gethostname()}" in errors[0], errors[0]
            assert os.listdir(out) == [os.path.basename(run_dir)]  # no second run folder
            assert open(lock).read().split()[0] == str(first.pid)  # the lock is still the first process's
            assert first.poll() is None  # and the first run trains on
        finally:
            first.send_signal(signal.SIGTERM)  # saves and exits
            try:
                first.wait(timeout=180)
            finally:
                if first.poll() is None:
                    first.kill()
                    first.wait()
    err = open(tmp_path / "first.err").read()
    assert first.returncode == 128 + signal.SIGTERM and "Traceback" not in err, (first.returncode, err[-3000:])
    assert not os.path.exists(lock), "the lock outlived its run"
    assert checkpoints.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))["step"] >= 2


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not checkpoints.pid_alive(p.pid)
    return p.pid


@pytest.mark.parametrize(
    "holder", ["dead", "own"], ids=["a_dead_process", "this_process_pid_after_a_container_restart"]
)
def test_a_stale_lock_on_this_host_is_taken_over_with_a_warning(capsys, tmp_path, holder):
    pid = dead_pid() if holder == "dead" else os.getpid()
    lock = tmp_path / "run.lock"
    lock.write_text(f"{pid} {socket.gethostname()}\n")
    capsys.readouterr()
    path = checkpoints.lock_run(str(tmp_path))
    err = capsys.readouterr().err
    assert path == str(lock)
    assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
    assert f"locked by process {pid}, which is gone: taking the run over" in err and err.startswith("warning:"), err
    checkpoints.release_lock(path)
    assert os.listdir(tmp_path) == []  # neither the lock nor the takeover's guard is left


def assert_lock_refused(tmp_path, holder, host, expected):
    """A run.lock of (holder, host) is refused in one line with `expected`, and left as it was."""
    lock = tmp_path / "run.lock"
    lock.write_text(f"{holder} {host}\n")
    with pytest.raises(configurator.UserError) as e:
        checkpoints.lock_run(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and expected in msg, msg
    assert lock.read_text() == f"{holder} {host}\n"  # not taken, not removed
    checkpoints.release_lock(str(lock))  # another process's lock: release_lock leaves it
    assert lock.exists()


def test_a_live_lock_on_this_host_is_one_line_and_left_alone(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert_lock_refused(
            tmp_path,
            live.pid,
            socket.gethostname(),
            f"run {tmp_path} is in use by process {live.pid} on {socket.gethostname()}",
        )
    finally:
        live.kill()
        live.wait()


def test_a_lock_from_another_host_names_the_file_to_delete_after_checking_that_host(tmp_path):
    """This host cannot see another host's processes (a node that died, a new container): the line
    says what to check and which file to delete."""
    pid = dead_pid()
    assert_lock_refused(
        tmp_path,
        pid,
        "some-other-host",
        f"locked by process {pid} on host some-other-host, which this host "
        f"cannot check: if no process on some-other-host trains this run any more, delete {tmp_path / 'run.lock'} "
        "and rerun",
    )


def test_the_lock_takes_no_posix_only_module_and_probes_liveness_without_os_kill_on_windows(monkeypatch):
    """train_diffusion starts on Windows: no fcntl in it or the modules that hold its run lock and
    processes, and pid_alive does not call os.kill there, where it would end the process it asks about."""
    import ast
    import inspect

    imported = {
        a.name.split(".")[0]
        for module in (td, checkpoints, distributed)
        for n in ast.walk(ast.parse(inspect.getsource(module)))
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])
    }
    assert not imported & {"fcntl", "termios", "pwd", "grp", "resource"}, imported
    monkeypatch.setattr(os, "name", "nt")
    monkeypatch.setattr(os, "kill", lambda *a: pytest.fail("os.kill on Windows ends the process"))
    with pytest.raises((AttributeError, OSError)):  # no kernel32 here: it got as far as asking Windows
        checkpoints.pid_alive(os.getpid())


def test_two_run_folders_in_the_same_second_are_two_folders(tmp_path, monkeypatch):
    from datetime import datetime

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 1, 2, 3, 4, 5)

    monkeypatch.setattr(checkpoints, "datetime", FrozenClock)
    made = [checkpoints.new_run_dir(str(tmp_path / "out"), "shapes") for _ in range(3)]
    assert len(set(made)) == 3 and all(os.path.isdir(p) for p in made), made
    assert os.path.basename(made[0]) == "20240102-030405-shapes"
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.basename(p) for p in made)


# ----- 5. bounded sampling: batches do not change the images


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, train_in_process, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_ckpt")
    return train_in_process(tiny + ["--max_steps=4", f"--out_dir={out}"])


def sample_into(run_dir, folder, *extra):
    sd.main(
        [
            f"--checkpoint={run_dir}",
            "--num_images=5",
            "--sampler=ddim",
            "--steps=3",
            "--device=cpu",
            f"--out_dir={folder}",
            *extra,
        ]
    )
    return {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}


@pytest.mark.parametrize("eta", ["0", "1"])
def test_the_batch_size_does_not_change_the_images(tiny_checkpoint, tmp_path, eta):
    by_batch = {
        b: sample_into(tiny_checkpoint, tmp_path / f"b{b}", f"--batch_size={b}", f"--eta={eta}") for b in (2, 5)
    }
    name = sd.NAME
    expected = {f"{name}{s}.png" for s in ("", "_cfg")} | {
        f"{name}{s}_{i:03d}.png" for s in ("", "_cfg") for i in range(5)
    }
    for b, files in by_batch.items():
        assert set(files) == expected, (b, sorted(files))
    for f in sorted(expected):
        assert by_batch[2][f] == by_batch[5][f], f"{f} differs between --batch_size=2 and --batch_size=5 (eta {eta})"
    singles = [by_batch[5][f"{name}_{i:03d}.png"] for i in range(5)]
    assert len(set(singles)) == 5, "two images of one call are identical: they share their noise"
    other = sample_into(tiny_checkpoint, tmp_path / "seed1", "--batch_size=5", "--seed=1", f"--eta={eta}")
    for f in sorted(expected):
        assert other[f] != by_batch[5][f], f"{f} is the same with --seed=1"


def test_the_grid_holds_at_most_grid_max_images(tiny_checkpoint, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(sd, "GRID_MAX", 3)
    files = sample_into(tiny_checkpoint, tmp_path / "g", "--batch_size=2")
    size = checkpoints.load_checkpoint(os.path.join(tiny_checkpoint, "ckpt.pt"))["model_args"]["image_size"]
    for suffix in ("", "_cfg"):
        with Image.open(tmp_path / "g" / f"{sd.NAME}{suffix}.png") as grid:
            assert grid.size == (3 * size + 4 * 2, size + 2 * 2), grid.size  # 3 images in one row, padding 2
    assert sum(f.startswith(sd.NAME + "_cfg_") for f in files) == 5  # every image is still written alone


def test_the_tiny_runs_name_their_device_and_config_file(tiny, capsys):
    """What the tiny tests cover is written in tests/, not merged from the CPU recipe on machines
    without a GPU only; and no GPU is visible to the tests (conftest.py)."""
    C, explicit = td.configure(tiny)
    assert "no GPU and no config file" not in capsys.readouterr().err
    assert C.device == "cpu" and {"patch_size", "prediction_type", "dropout"} <= explicit
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()


# ----- devices: CUDA, then Apple's mps, then the CPU


@pytest.mark.parametrize("cuda, mps, auto", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_takes_cuda_then_mps_then_the_cpu_and_an_absent_device_is_one_line(monkeypatch, cuda, mps, auto):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(configurator, "mps_available", lambda: mps)
    assert configurator.pick_device("auto").type == auto and configurator.pick_device("cpu").type == "cpu"
    for name, present in (("cuda", cuda), ("mps", mps)):
        if present:
            assert configurator.pick_device(name).type == name
        else:
            with pytest.raises(
                configurator.UserError, match=f"--device={name} but .* use --device=cpu or --device=auto"
            ):
                configurator.pick_device(name)


def test_apples_gpu_trains_the_cpu_recipe_in_fp32_in_one_process(monkeypatch, capsys):
    """On a Mac, auto is mps: the CPU recipe (not the H200's), no autocast (fp32), and no torchrun."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(configurator, "mps_available", lambda: True)
    C, _ = td.configure(["--max_steps=10"])
    recipe = configurator.read_config_file(td.CPU_RECIPE, td.DEFAULTS)
    assert C.patch_size == recipe["patch_size"] and C.batch_size == recipe["batch_size"]
    assert "no CUDA GPU and no config file: training the CPU recipe" in capsys.readouterr().err
    sysinfo = distributed.setup_device(C)
    assert sysinfo.device == torch.device("mps") and not sysinfo.ddp
    assert not isinstance(sysinfo.autocast, torch.autocast)  # fp32
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(configurator.UserError, match="torchrun with --device=mps"):
        distributed.setup_device(C)


@pytest.mark.parametrize("speedup", [0.6, 2.9, 3.0, 7.1])  # measured: 0.57 Xeon without AMX, 3.9 EPYC, 7.1 AMX
def test_auto_precision_is_bf16_on_cuda_and_on_cpus_whose_bf16_matmuls_pay_else_fp32(monkeypatch, capsys, speedup):
    monkeypatch.setattr(distributed, "cpu_bf16_speedup", lambda: speedup)
    pays = speedup >= distributed.BF16_MIN_MATMUL_SPEEDUP
    assert distributed.pick_precision("auto", "cpu") == ("bf16" if pays else "fp32")
    assert distributed.pick_precision("auto", "cuda") == "bf16"
    assert distributed.pick_precision("auto", "mps") == "fp32"
    for kind in ("cpu", "cuda"):  # asked for, either one, whatever the CPU measures
        assert distributed.pick_precision("bf16", kind) == "bf16" and distributed.pick_precision("fp32", kind) == "fp32"
    with pytest.raises(configurator.UserError, match="--dtype=bf16 on Apple's GPU .* use --dtype=fp32 or auto"):
        distributed.pick_precision("bf16", "mps")
    C, _ = td.configure(["--device=cpu"])
    sysinfo = distributed.setup_device(C)
    assert sysinfo.precision == ("bf16" if pays else "fp32")
    assert isinstance(sysinfo.autocast, torch.autocast) == pays
    label = f"bf16 autocast (bf16 matmuls {speedup:.1f}x fp32 on this CPU)"  # the banner says what decided it
    assert sysinfo.precision_label == (label if pays else "fp32")
    C, _ = td.configure(["--device=cpu", "--dtype=fp32"])
    assert not isinstance(distributed.setup_device(C).autocast, torch.autocast)
    capsys.readouterr()
    C, _ = td.configure(["--device=cpu", "--dtype=bf16"])  # asked for where it does not pay: granted, with a warning
    assert distributed.setup_device(C).precision == "bf16"
    warned = capsys.readouterr().err
    assert warned.count(f"warning: --dtype=bf16 on a CPU whose bf16 matmuls run at {speedup:.2f}x") == (not pays)


def test_the_cpu_bf16_probe_times_real_matmuls_once_per_process():
    distributed.cpu_bf16_speedup.cache_clear()
    first = distributed.cpu_bf16_speedup()
    assert math.isfinite(first) and first > 0
    assert distributed.cpu_bf16_speedup() == first  # cached: every setup_device of a process decides alike
    assert distributed.cpu_bf16_speedup.cache_info().hits >= 1


def test_the_training_settings_read_as_data_are_the_scripts_defaults():
    # bench_layout reads them so without importing train_diffusion.py (scripts never import scripts)
    import configurator
    import train_diffusion

    assert configurator.read_script_settings(train_diffusion.__file__) == train_diffusion.DEFAULTS


def test_no_script_imports_an_entry_script():
    import ast

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    entry = {"train_diffusion", "sample_diffusion"}
    for path in glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "benchmarks", "*.py")):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not entry & {n.split(".")[0] for n in names}, f"{path} imports {names}"
