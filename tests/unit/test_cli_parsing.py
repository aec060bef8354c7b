"""Command-line parsing: units, device limits, and one-line argument errors (no sockets)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from jobworker import cli
from jobworker.cli.options import limits_from_options
from jobworker.hooks.host import Plugins
from jobworker.jobspec import IoLimit, Limits
from jobworker.units import (
    parse_cores,
    parse_count,
    parse_rate,
    parse_seconds,
    parse_size,
    split_device_value,
)


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Neither the caller's environment nor their dev PKI may change these results."""
    for name in ("JOBWORKER_SERVER", "JOBWORKER_TLS_CERT", "JOBWORKER_TLS_KEY", "JOBWORKER_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JOBWORKER_HOME", str(tmp_path / "no-pki"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("100", 100),
        ("100B", 100),
        ("512K", 512 << 10),
        ("512k", 512 << 10),
        ("256M", 256 << 20),
        ("256MiB", 256 << 20),
        ("256mb", 256 << 20),
        ("1G", 1 << 30),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        (" 64 K ", 64 << 10),
        ("0.5K", 512),
    ],
)
def test_sizes_use_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12X", "-1", "1e3", "0", "0K", "0.1", "1iB", "1 G G"])
def test_bad_sizes_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid size .*(e\.g\. 256M|at least one byte)"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"), [("10M", 10 << 20), ("10M/s", 10 << 20), ("1k/S", 1024)]
)
def test_rates_are_bytes_per_second(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


def test_bad_rate_names_rate() -> None:
    with pytest.raises(ValueError, match=r"invalid rate '10Q/s'.*e\.g\. 10M"):
        parse_rate("10Q/s")


def test_counts_cores_and_seconds() -> None:
    assert parse_count("100") == 100
    assert parse_cores("0.5") == 0.5
    assert parse_seconds("0") == 0.0
    assert parse_seconds("2.5") == 2.5
    for parse, text in [
        (parse_count, "0"),
        (parse_count, "1.5"),
        (parse_cores, "0"),
        (parse_cores, "nan"),
        (parse_cores, "inf"),
        (parse_cores, "half"),
        (parse_seconds, "-1"),
        (parse_seconds, "inf"),
    ]:
        with pytest.raises(ValueError, match="invalid"):
            parse(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("/dev/sda=10M", ("/dev/sda", "10M")), ("8:0=100", ("8:0", "100"))],
)
def test_device_values_pass_the_device_through(text: str, expected: tuple[str, str]) -> None:
    assert split_device_value(text) == expected


@pytest.mark.parametrize("text", ["/dev/sda", "=10M", "/dev/sda=", ""])
def test_bad_device_values(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected DEV=VALUE"):
        split_device_value(text)


def _parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser(Plugins()).parse_args(argv)


def test_limits_flags_build_one_limits_with_io_merged_per_device() -> None:
    options = _parse(
        "start",
        "--cpu", "0.5",
        "--memory", "256M",
        "--pids", "64",
        "--io-read-bps", "/dev/sda=10M",
        "--io-write-bps", "/dev/sda=1M/s",
        "--io-read-iops", "8:16=100",
        "--io-write-iops", "/dev/sda=50",
        "--", "dd", "if=/dev/zero",
    )  # fmt: skip
    assert limits_from_options(options) == Limits(
        cpu=0.5,
        memory=256 << 20,
        pids=64,
        io=(  # type: ignore[arg-type]  # mypy cannot type jobspec.Limits' tuple converter
            IoLimit(device="/dev/sda", rbps=10 << 20, wbps=1 << 20, wiops=50),
            IoLimit(device="8:16", riops=100),
        ),
    )


def test_no_limits_flags_send_no_limits() -> None:
    assert limits_from_options(_parse("start", "--", "true")) is None


def test_command_after_double_dash_keeps_its_own_options() -> None:
    options = _parse("run", "--env", "A=b=c", "--", "sh", "-c", "echo -- --cpu 1")
    assert options.command == ["sh", "-c", "echo -- --cpu 1"]
    assert options.env == [("A", "b=c")]
    assert options.cpu is None


def _error_of(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    assert captured.out == ""
    return status, captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--memory", "12X", "--", "true"], "argument --memory: invalid size '12X'"),
        (["run", "--cpu", "0", "--", "true"], "argument --cpu: invalid CPU amount '0'"),
        (["start", "--io-read-bps", "sda", "--", "true"], "expected DEV=VALUE"),
        (["start", "--io-write-iops", "8:0=lots", "--", "true"], "invalid number 'lots'"),
        (["start", "--env", "NOEQUALS", "--", "true"], "expected KEY=VALUE"),
        (
            ["start", "--io-read-bps", "8:0=1M", "--io-read-bps", "8:0=2M", "--", "true"],
            "argument --io-read-bps: given twice for device 8:0",
        ),
        (["run"], "the following arguments are required: CMD"),
        (["stop", "job", "--grace", "soon"], "invalid duration 'soon'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["certs", "init", "--client", "bob:root"], "invalid client 'bob:root'"),
        (
            ["serve", "--plugin", "no-such-plugin"],
            "unknown plugin 'no-such-plugin': neither built in nor installed",
        ),
        (["plugins", "--plugin", "no-such-plugin"], "unknown plugin 'no-such-plugin'"),
        (
            ["status", "job", "--tls-cert", "c.pem"],
            "missing --tls-key (or JOBWORKER_TLS_KEY), --tls-ca (or JOBWORKER_TLS_CA)",
        ),
        (["list"], "no client certificate"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, err = _error_of(capsys, *argv)
    assert status == 2
    assert err.count("\n") == 1
    assert err.startswith("jobworker: error: ")
    assert message in err


def test_partial_tls_from_environment_names_the_variables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBWORKER_TLS_CA", "/ca.pem")
    status, err = _error_of(capsys, "list", "--tls-cert", "c.pem")
    assert status == 2
    assert "missing --tls-key (or JOBWORKER_TLS_KEY)\n" in err


def test_unreadable_certificate_is_a_local_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nope.pem"
    status, err = _error_of(
        capsys, "list", "--tls-cert", str(missing), "--tls-key", "k", "--tls-ca", "ca"
    )
    assert status == 2
    assert err == f"jobworker: error: certificate {missing} does not exist\n"


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--io-write-iops DEV=N" in out
