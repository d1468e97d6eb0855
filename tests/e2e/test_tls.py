"""End-to-end tests of MQTT over TLS (mqtt.tls, ca_file, client_cert_file, client_key_file):
rtcam talks to a mosquitto TLS listener that demands a client certificate."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import HOST, Monitor, Mosquitto, Rtcam, free_port, rtcam_binary, tail, wait_tcp
from viewer import Viewer

from test_stream import run, stop


def openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{r.stderr}")


def make_pki(d: Path, ca: str = "ca") -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256."""
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=rtcam test {ca}",
            cwd=d)
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN=rtcam test {who}", cwd=d)
        ext_file = d / f"{who}.ext"
        ext_file.write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{who}.pem", "-days", "2", "-extfile", str(ext_file),
                cwd=d)


class TlsMosquitto(Mosquitto):
    """A broker with a plain listener (for the test's own clients) and a TLS listener that
    requires a client certificate signed by the test CA."""

    name = "mosquitto-tls"

    def __init__(self, workdir: Path, pki: Path):
        super().__init__(workdir)
        self.tls_port = free_port()
        self.extra_conf = (
            f"listener {self.tls_port} {HOST}\n"
            f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
            "require_certificate true\n"
        )

    def start(self) -> None:
        super().start()
        if not wait_tcp(self.tls_port, 10):
            self.stop()
            pytest.fail(f"mosquitto TLS listener not up:\n{tail(self.log_path)}", pytrace=False)


@pytest.fixture(scope="module")
def tls_env(workdir):
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.fail("openssl is not installed (apt-get install openssl); the TLS test needs it", pytrace=False)
    pki, other = workdir / "pki", workdir / "pki-other"
    make_pki(pki)
    make_pki(other, ca="other-ca")
    broker = TlsMosquitto(workdir, pki)
    broker.start()
    mon = Monitor(broker.port)
    yield broker, mon, pki, other
    mon.close()
    broker.stop()


def test_rtcam_streams_over_a_mutual_tls_broker_connection(tls_env, workdir):
    broker, mon, pki, _ = tls_env
    cam = Rtcam(
        workdir, "tlscam", broker.tls_port, mon,
        mqtt__tls=True, mqtt__ca_file=str(pki / "ca.pem"),
        mqtt__client_cert_file=str(pki / "client.pem"), mqtt__client_key_file=str(pki / "client.key"),
    )
    cam.start()  # waits for the retained `online` status, seen on the plain listener
    try:
        async def body():
            v = Viewer(HOST, broker.port, "tlscam")  # the viewer uses the plain listener
            try:
                await v.start()
                await v.wait_frames(30, 15)
                return len(v.frames)
            finally:
                await stop(v)

        frames = run(body(), 40)
        assert frames >= 30
    finally:
        cam.stop()
    log = cam.log_path.read_text(errors="replace")
    assert "MQTT connected" in log, tail(cam.log_path)


@pytest.mark.parametrize(
    "case",
    ["wrong-ca", "no-client-certificate"],
)
def test_rtcam_refuses_an_untrusted_broker_and_is_refused_without_a_certificate(tls_env, workdir, case):
    broker, mon, pki, other = tls_env
    device = f"tls-{case}"
    overrides = {"mqtt__tls": True, "mqtt__ca_file": str(pki / "ca.pem")}
    if case == "wrong-ca":
        # rtcam trusts another CA: the broker's certificate must be refused.
        overrides.update(mqtt__ca_file=str(other / "other-ca.pem"),
                         mqtt__client_cert_file=str(pki / "client.pem"),
                         mqtt__client_key_file=str(pki / "client.key"))
    cam = Rtcam(workdir, device, broker.tls_port, mon, **overrides)
    cam.write_config()
    cam.spawn([str(rtcam_binary()), "--config", str(cam.config_path)])
    try:
        time.sleep(4)
        assert cam.alive(), f"rtcam keeps running and retrying:\n{tail(cam.log_path)}"
        assert mon.latest(cam.topic_status) is None, "never came online"
        log = cam.log_path.read_text(errors="replace")
        # The error names the broker and the connection mode.
        assert re.search(r"MQTT connection failed broker=127\.0\.0\.1:\d+ \(TLS, ", log), tail(cam.log_path)
        if case == "wrong-ca":
            assert "certificate" in log.lower(), tail(cam.log_path)
    finally:
        assert cam.stop() == 0, tail(cam.log_path)
