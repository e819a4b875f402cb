"""bench.safety: only loopback targets."""

from __future__ import annotations

import pytest

from bench.safety import NonLoopbackTarget, is_loopback_host, require_loopback


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.8.9.10/x",
    "http://localhost:8000", "http://LOCALHOST", "http://[::1]:8000",
    "https://127.0.0.1", "http://[::ffff:127.0.0.1]:8000",
])
def test_loopback_accepted(url: str) -> None:
    assert require_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize("url", [
    "http://10.0.0.1:8000", "http://192.168.1.5", "http://0.0.0.0:8000",
    "http://example.com", "http://localhost.example.com", "http://128.0.0.1",
    "http://[::2]", "ftp://127.0.0.1", "http://", "127.0.0.1:8000",
    "http://127.0.0.1.nip.io",
])
def test_others_refused_with_clear_error(url: str) -> None:
    with pytest.raises(NonLoopbackTarget, match="refusing target"):
        require_loopback(url)


def test_host_check() -> None:
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1")
    assert not is_loopback_host("") and not is_loopback_host("8.8.8.8")


def test_cli_refuses_before_doing_anything(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.load import main
    assert main(["seed-mix", "--url", "http://10.1.2.3:8000", "--duration", "1"]) == 2
    assert "refusing target" in capsys.readouterr().err
    from bench.compare import main as compare_main
    assert compare_main(["--url", "http://127.0.0.1:8000",
                         "--floor-url", "http://example.com/noop"]) == 2


def test_joins_reads_wrks_report():
    from bench.joins import wrk_rate

    out = """Running 8s test @ http://127.0.0.1:8000/api/events/e/queue
  1 threads and 64 connections
  28584 requests in 8.01s, 10.77MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   3566.99
"""
    assert wrk_rate(out) == (28584, 3566.99, 3)
    assert wrk_rate(out.replace("  Non-2xx or 3xx responses: 3\n", "")) == (28584, 3566.99, 0)
    with pytest.raises(ValueError):
        wrk_rate("wrk: connection refused")


def test_joins_reads_the_answers_statuses():
    from bench.joins import wrk_statuses

    out = "Requests/sec:   3566.99\nTransfer/sec:      1.34MB\nstatuses: 201=28581 409=3\n"
    assert wrk_statuses(out) == {201: 28581, 409: 3}
    assert wrk_statuses("statuses: \n") == {}
    with pytest.raises(ValueError):
        wrk_statuses("Requests/sec:   3566.99\n")


def test_joins_refuses_a_target_off_this_machine(capsys):
    from bench.joins import main

    assert main(["--url", "http://example.com:8000"]) == 2
