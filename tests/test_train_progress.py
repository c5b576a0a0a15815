"""Training progress where users read it: tqdm's bar in a terminal, one plain line per trainer.log_every steps (with
the ETA) in a log file, never carriage-return frames there."""

from __future__ import annotations

import io
import re
import subprocess

from helpers.launch import tiny_run, train_command, train_env

from hybridlm.train.progress import Progress, format_duration

METRICS = {"loss": 2.0, "ce_loss": 1.9, "aux_loss": 0.1, "z_loss": 0.0, "lr": 1e-3, "tokens_per_s": 1234.0}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_bar_and_a_log_file_only_plain_lines(tmp_path, capsys):
    terminal = Terminal()
    progress = Progress(max_steps=4, end_step=4, start_step=0, show_bar=True, stream=terminal)
    for step in range(1, 5):
        progress.step_done()
    progress.log(4, METRICS)
    progress.close()
    assert "\r" in terminal.getvalue() and "4/4" in terminal.getvalue()
    assert "step 4/4 | loss 2.0000" in capsys.readouterr().out

    with (tmp_path / "job.err").open("w") as log_file:
        progress = Progress(max_steps=4, end_step=4, start_step=0, show_bar=True, stream=log_file)
        progress.step_done()
        progress.close()
    assert (tmp_path / "job.err").read_text() == ""  # no bar, not even a final frame


def test_eta_is_time_per_step_times_the_steps_left_to_where_this_job_stops(monkeypatch):
    clock = iter([100.0, 130.0])
    monkeypatch.setattr("hybridlm.train.progress.time.perf_counter", lambda: next(clock))
    progress = Progress(max_steps=1000, end_step=40, start_step=10, show_bar=False)  # resumed at 10, stop_at_step 40
    assert progress.eta_s(20) == 60.0  # 30 s for 10 steps, 20 steps to go
    assert format_duration(60.0) == "0:01:00" and format_duration(3 * 3600 + 65.4) == "3:01:05"


def test_a_run_logging_to_a_file_writes_one_plain_line_per_log_every_steps_with_the_eta(data_cache, tmp_path):
    overrides = [o for o in tiny_run(data_cache) if not o.startswith(("trainer.log_every", "trainer.progress_bar"))]
    overrides += ["trainer.max_steps=6", "trainer.log_every=2", "trainer.progress_bar=true"]
    log = tmp_path / "slurm-123.out"  # stdout and stderr in one file, as sbatch --output writes them
    with log.open("w") as handle:
        subprocess.run(train_command(tmp_path / "run", overrides), cwd=tmp_path, env=train_env(), stdout=handle,
                       stderr=subprocess.STDOUT, timeout=900, check=True)  # fmt: skip
    text = log.read_text()
    assert "\r" not in text
    progress_lines = [line for line in text.splitlines() if re.match(r"step \d+/6 \| loss", line)]
    assert [line.split(" | ")[0] for line in progress_lines] == ["step 2/6", "step 4/6", "step 6/6"], text[-3000:]
    for line in progress_lines:
        assert re.search(r"\| lr \d\.\d\de-\d\d \|", line) and " tok/s" in line
        assert re.search(r"\| ETA \d+:\d\d:\d\d$", line), line
    assert progress_lines[-1].endswith("ETA 0:00:00")
