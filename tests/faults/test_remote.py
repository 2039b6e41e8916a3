"""Misbehaving servers: a table of Open Inference Protocol servers that answer slowly, never, half, too much, wrongly
or as someone else, driven by a small in-test server on 127.0.0.1 (tests/faults/oip_server.py).  Each case ends
within its deadline (asserted with a generous bound), exits with the documented code, and prints one line."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeguard.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from oip_server import OipServer  # noqa: E402

REMOTE, BAD = 4, 2  # exit codes: the server failed / the answer breaks the output contract

CASES = [
    # behaviour, extra argv, exit code, words in the one line, seconds allowed
    ("trickle", ["--timeout", "2"], REMOTE, "did not answer an inference request within 2 s", 8),
    ("never", ["--timeout", "2"], REMOTE, "did not answer an inference request within 2 s", 8),
    ("closes_mid_body", [], REMOTE, "closed the connection after", 8),
    ("huge", [], REMOTE, "more than the 64 MiB allowed", 8),
    ("nan", [], BAD, "row 1 is not finite", 8),
    ("negative", [], BAD, "row 2 has a negative entry", 8),
    ("unnormalised", [], BAD, "row 0 sums to", 8),
    ("logits", [], BAD, "pass --outputs logits", 8),
    ("bytes_declared", [], BAD, "declares its output 'y' as BYTES", 8),
    ("wrong_dtype", [], BAD, "answered FP64 where its metadata declares FP32", 8),
    ("wrong_shape", [], BAD, "answered shape [32, 9]", 8),
    ("redirect", [], REMOTE, "redirects are not followed", 8),
    ("malformed_json", [], REMOTE, "malformed JSON", 8),
    ("error_500", [], REMOTE, "HTTP 500: internal failure", 8),
    ("disappears", [], REMOTE, "disappeared from the server", 8),
    ("metadata_changes", [], REMOTE, "changed mid-run", 8),
]


@pytest.mark.parametrize("behaviour, argv, code, words, bound", CASES, ids=[c[0] for c in CASES])
def test_a_misbehaving_server_ends_in_time_with_one_line(behaviour, argv, code, words, bound, capsys):
    with OipServer(behaviour) as srv:
        t0 = time.monotonic()
        rc = main(["evaluate", srv.url + "?retries=1&backoff=0.05", *argv])
        took = time.monotonic() - t0
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert rc == code, (rc, err)
    assert len(err) == 1 and words in err[0], err
    assert "Traceback" not in captured.err + captured.out
    assert took < bound, took


def test_an_honest_server_passes_and_a_logits_server_passes_with_outputs_logits(capsys):
    with OipServer("ok") as srv:
        assert main(["evaluate", srv.url]) == 0
    with OipServer("logits") as srv:
        assert main(["evaluate", srv.url, "--outputs", "logits", "--json", "/dev/null"]) == 0
        assert srv.infers == 17  # 540 digits in batches of max_batch_size 32


def test_the_whole_check_has_a_deadline(capsys):
    with OipServer("trickle") as srv:
        t0 = time.monotonic()
        rc = main(["evaluate", srv.url, "--timeout", "30", "--deadline", "1.5"])
        took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == REMOTE and len(err) == 1 and "within its deadline of 1.5 s (--deadline)" in err[0], err
    assert took < 6


def test_unreachable_is_its_own_exit_code(capsys):
    from edgeguard.serve import free_ports

    rc = main(["evaluate", f"http://127.0.0.1:{free_ports(1)[0]}/v2/models/m?retries=1&backoff=0.05", "--timeout", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == REMOTE and len(err) == 1 and "cannot reach" in err[0] and "after 2 attempt(s)" in err[0], err


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_request_ends_with_one_line(sig, code):
    """Mid-flight: the server has the request and never answers; the signal ends the command at once."""
    with OipServer("never") as srv:
        p = subprocess.Popen([sys.executable, "-m", "edgeguard", "evaluate", srv.url, "--timeout", "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        end = time.monotonic() + 60
        while srv.infers == 0 and time.monotonic() < end and p.poll() is None:
            time.sleep(0.05)
        assert srv.infers == 1, "the request never reached the server"
        t0 = time.monotonic()
        p.send_signal(sig)
        out, err = p.communicate(timeout=20)
        took = time.monotonic() - t0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == code, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("edgeguard: "), err
    assert took < 5, took
