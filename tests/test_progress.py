"""Progress bars (bitpress._core.progress): what a line shows, when lines are written on a
terminal and in a log, the final line, quiet mode, iteration and manual updates."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from bitpress._core import progress as P
from bitpress._core.progress import format_rate, format_time, progress, quiet, set_quiet
from bitpress.int4.gptq import gptq_quantize_model
from bitpress.sparse24.prune import prune_model
from bitpress.speculative.distill import distill_draft


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _loud(monkeypatch):
    """Every test starts with bars on, whatever the environment of the run."""
    monkeypatch.delenv("BITPRESS_QUIET", raising=False)
    monkeypatch.delenv("BITPRESS_PROGRESS_INTERVAL", raising=False)
    set_quiet(None)
    yield
    set_quiet(None)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_format_time():
    assert format_time(0) == "00:00"
    assert format_time(59.4) == "00:59"
    assert format_time(61) == "01:01"
    assert format_time(3599) == "59:59"
    assert format_time(3600 + 62) == "1:01:02"


def test_format_rate_fast_and_slow():
    assert format_rate(123, 10.0) == "12.3 it/s"
    assert format_rate(10, 41.0, "layer") == "4.1 s/layer"
    assert format_rate(1, 1.0) == "1.0 it/s"
    assert format_rate(12_300, 1.0, "tok") == "12.3k tok/s"
    assert format_rate(0, 5.0) == "? it/s"
    assert format_rate(3, 0.0) == "? it/s"


def test_line_shows_bar_count_elapsed_rate_eta_postfix():
    clock, out = FakeClock(), io.StringIO()
    bar = progress(total=20, desc="GPTQ", unit="layer", file=out, clock=clock)
    clock.advance(12.0)
    bar.n = 9
    bar.set_postfix(loss=2.3125, layer="q_proj")
    line = bar.format_line()
    assert line.startswith("GPTQ   45%|" + "#" * 9 + " " * 11 + "| 9/20")
    assert "00:12 elapsed" in line
    # 11 layers left at 12 s / 9 layers = 14.7 s
    assert "ETA 00:15" in line
    assert "1.3 s/layer" in line
    assert line.endswith("loss=2.312, layer=q_proj")


def test_eta_follows_the_rate():
    clock = FakeClock()
    bar = progress(total=100, file=io.StringIO(), clock=clock)
    clock.advance(10.0)
    bar.n = 25  # 2.5 it/s, 75 left -> 30 s
    assert "ETA 00:30" in bar.format_line()
    assert "2.5 it/s" in bar.format_line()
    clock.advance(10.0)
    bar.n = 100
    assert "ETA" not in bar.format_line()  # done
    assert "100%" in bar.format_line()


def test_unknown_total_has_no_bar_and_no_eta():
    clock = FakeClock()
    bar = progress(desc="scan", unit="batch", file=io.StringIO(), clock=clock)
    clock.advance(2.0)
    bar.n = 7
    line = bar.format_line()
    assert line.startswith("scan  7 batch  00:02 elapsed")
    assert "ETA" not in line and "|" not in line and "%" not in line
    assert "3.5 batch/s" in line


def test_no_eta_before_the_first_item():
    clock = FakeClock()
    bar = progress(total=5, file=io.StringIO(), clock=clock)
    clock.advance(3.0)
    assert "ETA ?" in bar.format_line()
    assert "? it/s" in bar.format_line()


def test_log_stream_is_throttled_and_has_a_final_line():
    clock, out = FakeClock(), io.StringIO()
    bar = progress(total=800, desc="d", file=out, clock=clock)
    assert out.getvalue() == ""  # a log waits for progress
    for _ in range(800):
        clock.advance(1 / 16)  # 50 s in all (exact in binary): one line per 10 s
        bar.update()
    assert len(lines(out)) == 5
    bar.close()
    got = lines(out)
    assert len(got) == 6
    assert "800/800" in got[-1] and "00:50 elapsed" in got[-1]
    assert "\r" not in out.getvalue()
    # Lines in between show progress at the time they were written.
    assert "160/800" in got[0] and "00:10 elapsed" in got[0] and "ETA 00:40" in got[0]
    assert "320/800" in got[1]
    bar.close()  # idempotent
    assert len(lines(out)) == 6


def test_log_interval_from_environment(monkeypatch):
    monkeypatch.setenv("BITPRESS_PROGRESS_INTERVAL", "1")
    clock, out = FakeClock(), io.StringIO()
    bar = progress(total=10, file=out, clock=clock)
    for _ in range(10):
        clock.advance(0.5)
        bar.update()
    assert len(lines(out)) == 5
    monkeypatch.setenv("BITPRESS_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="BITPRESS_PROGRESS_INTERVAL"):
        progress(total=1, file=io.StringIO())


def test_short_loop_in_a_log_prints_only_the_final_line():
    clock, out = FakeClock(), io.StringIO()
    for _ in progress(range(3), desc="quick", file=out, clock=clock):
        clock.advance(0.1)
    assert len(lines(out)) == 1
    assert lines(out)[0].startswith("quick  100%|")
    assert "3/3" in lines(out)[0]


def test_tty_redraws_in_place_at_most_ten_times_a_second():
    clock, out = FakeClock(), Tty()
    bar = progress(total=1000, desc="t", file=out, clock=clock)
    assert out.getvalue().startswith("\r") and "0/1000" in out.getvalue()
    for _ in range(1000):
        clock.advance(0.01)  # 10 s: at most 100 redraws, not 1000
        bar.update()
    draws = out.getvalue().count("\r")
    assert 90 <= draws <= 101
    assert "\n" not in out.getvalue()
    bar.close()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    assert "1000/1000" in text.rsplit("\r", 1)[-1]


def test_tty_shorter_line_erases_the_longer_one():
    clock, out = FakeClock(), Tty()
    bar = progress(total=2, file=out, clock=clock)
    bar.set_postfix(note="a long postfix that will go away")
    clock.advance(1.0)
    bar.refresh()
    before = len(out.getvalue().rsplit("\r", 1)[-1])
    bar.set_postfix()
    clock.advance(1.0)
    bar.refresh()
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert len(last) >= before  # padded with spaces over the old text
    assert "long postfix" not in last


def test_clear_erases_and_next_update_redraws():
    clock, out = FakeClock(), Tty()
    bar = progress(total=3, file=out, clock=clock)
    bar.clear()
    assert out.getvalue().endswith("\r")
    n = len(out.getvalue())
    bar.update()  # no time passed, yet the cleared bar comes back
    assert len(out.getvalue()) > n and "1/3" in out.getvalue()[n:]


def test_iterator_yields_everything_and_counts():
    clock, out = FakeClock(), io.StringIO()
    bar = progress(iter("abcde"), desc="it", file=out, clock=clock)
    assert bar.total is None  # a plain iterator has no len
    assert list(bar) == list("abcde")
    assert bar.n == 5
    assert "5 it" in lines(out)[-1]


def test_iteration_closes_on_break_and_on_error():
    out = io.StringIO()
    for i in progress(range(10), file=out, clock=FakeClock()):
        if i == 3:
            break
    assert len(lines(out)) == 1 and "3/10" in lines(out)[0]

    out = io.StringIO()
    with pytest.raises(KeyError):
        for i in progress(range(10), file=out, clock=FakeClock()):
            if i == 2:
                raise KeyError(i)
    assert len(lines(out)) == 1 and "2/10" in lines(out)[0]


def test_manual_update_with_postfix_and_context_manager():
    clock, out = FakeClock(), io.StringIO()
    with progress(total=4, desc="distill", unit="step", file=out, clock=clock) as bar:
        for loss in (3.5, 3.0, 2.5, 2.3125):
            clock.advance(2.0)
            bar.update(loss=loss)
        bar.update(0, lr=1e-3)  # postfix entries add up
    assert bar.n == 4
    final = lines(out)[-1]
    assert "4/4" in final and "2.0 s/step" in final
    assert final.endswith("loss=2.312, lr=0.001")


def test_update_by_more_than_one_and_overshoot():
    clock = FakeClock()
    bar = progress(total=10, file=io.StringIO(), clock=clock)
    bar.update(4)
    bar.update(8)
    assert bar.n == 12
    assert "100%" in bar.format_line()  # the bar stays within its width
    assert "|" + "#" * P.BAR_WIDTH + "|" in bar.format_line()


def test_iterating_without_iterable_raises():
    with pytest.raises(TypeError, match="progress: "):
        list(progress(total=3, file=io.StringIO()))


def test_quiet_context_manager_writes_nothing():
    out, tty = io.StringIO(), Tty()
    with quiet():
        assert P.is_quiet()
        assert list(progress(range(5), file=out, clock=FakeClock())) == list(range(5))
        bar = progress(total=3, file=tty, clock=FakeClock())
        bar.update(3, loss=1.0)
        bar.refresh()
        bar.clear()
        bar.close()
        assert bar.n == 3  # still counts
    assert out.getvalue() == "" and tty.getvalue() == ""
    assert not P.is_quiet()


def test_set_quiet_and_environment(monkeypatch):
    out = io.StringIO()
    set_quiet(True)
    progress(total=1, file=out).close()
    assert out.getvalue() == ""
    set_quiet(False)
    progress(total=1, file=out).close()
    assert len(lines(out)) == 1

    monkeypatch.setenv("BITPRESS_QUIET", "1")
    set_quiet(None)
    out = io.StringIO()
    for _ in progress(range(3), file=out):
        pass
    assert out.getvalue() == ""
    with quiet(False):  # an explicit setting wins over the environment
        progress(total=1, file=out).close()
    assert len(lines(out)) == 1
    monkeypatch.setenv("BITPRESS_QUIET", "0")
    assert not P.is_quiet()


def test_default_stream_is_stderr(capsys):
    for _ in progress(range(2), desc="to-stderr"):
        pass
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "to-stderr" in captured.err and "2/2" in captured.err


# ---- the long loops that show a bar -----------------------------------------------------------


class _Stack(torch.nn.Module):
    """A decoder-layer list (``layers``) of Linear layers: what calibrate_layerwise walks."""

    def __init__(self, n_layers: int = 3, width: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width, bias=False), torch.nn.ReLU())
            for _ in range(n_layers)
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _calibration():
    return [torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def test_gptq_shows_one_bar_over_the_layers(capsys):
    gptq_quantize_model(_Stack(), _calibration(), group_size=32)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1  # a log (captured stderr): the final line only
    assert err.startswith("GPTQ  100%|") and "3/3" in err
    assert "layer/s" in err or "s/layer" in err


def test_sparsegpt_shows_one_bar_over_the_layers(capsys):
    prune_model(_Stack(4), "sparsegpt", _calibration())
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("2:4 sparsegpt  100%|") and "4/4" in err


def test_layer_loops_are_silent_when_quiet(capsys):
    with quiet():
        gptq_quantize_model(_Stack(), _calibration(), group_size=32)
        prune_model(_Stack(), "wanda", _calibration())
    assert capsys.readouterr().err == ""


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.head(self.emb(input_ids)))


def test_distill_shows_steps_with_loss_and_keeps_its_log(capsys):
    batches = [torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))]
    logged: list[str] = []
    losses = distill_draft(
        _TinyLM(seed=1), _TinyLM(seed=2), batches, steps=5, log=logged.append, log_every=2
    )
    assert len(losses) == 5
    assert logged == [f"  distill step {s:4d}  loss {losses[s]:.4f}" for s in (0, 2, 4)]
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("distill  100%|") and "5/5" in err
    assert err.rstrip().endswith(f"loss={losses[-1]:.4g}")
