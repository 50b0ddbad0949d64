"""WS-Discovery (multicast and unicast) against ipycam, the HTTP probe against the SOAP fixture, and the
ProbeMatches parser under hypothesis.

Multicast runs on the loopback interface: the probe leaves with IP_MULTICAST_IF 127.0.0.1 and ipycam's
discovery socket joins 239.255.255.250 on 127.0.0.1 (Linux delivers group traffic on lo although lo does
not carry the MULTICAST flag), so no network namespace is needed and nothing leaves the box."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeagent.drivers.camera.onvif.discovery import (
    MAX_MATCHES,
    DiscoveredCamera,
    build_probe,
    discover,
    expand_targets,
    parse_device_information,
    parse_probe_matches,
)
from tests.onvif_peer import IpycamPeer, OnvifFixture, free_udp_port


@pytest.fixture(scope="module")
def ipycam() -> Iterator[IpycamPeer]:
    with IpycamPeer() as peer:
        yield peer


def _only(found: list[DiscoveredCamera], peer: IpycamPeer) -> DiscoveredCamera:
    assert len(found) == 1, found
    cam = found[0]
    assert cam.xaddrs == (f"http://127.0.0.1:{peer.port}/onvif/device_service",)
    assert cam.name == "ipycam-peer" and cam.address == "127.0.0.1"
    assert cam.endpoint is not None and cam.endpoint.startswith("urn:uuid:")
    assert "dn:NetworkVideoTransmitter" in cam.types
    return cam


async def test_unicast_probe_of_a_host(ipycam: IpycamPeer) -> None:
    found = await discover(multicast=False, unicast=[f"127.0.0.1:{ipycam.discovery_port}"], timeout_s=1.0)
    assert _only(found, ipycam).via == ("unicast",)


async def test_multicast_probe_on_loopback(ipycam: IpycamPeer) -> None:
    found = await discover(multicast=True, interfaces=["127.0.0.1"], port=ipycam.discovery_port, timeout_s=1.0)
    assert _only(found, ipycam).via == ("multicast",)


async def test_subnet_scan_merges_answers_per_device(ipycam: IpycamPeer) -> None:
    # ipycam's socket is bound to every address: each of 127.0.0.1-6 answers, as one device.
    found = await discover(multicast=False, unicast=[f"127.0.0.0/29:{ipycam.discovery_port}"], timeout_s=1.0)
    assert len(found) == 1 and found[0].via == ("unicast",)


async def test_http_probe_finds_a_camera_that_ignores_ws_discovery(ipycam: IpycamPeer) -> None:
    async with OnvifFixture() as fx:  # the fixture speaks no WS-Discovery at all
        found = await discover(multicast=False, unicast=[f"127.0.0.1:{ipycam.discovery_port}"], timeout_s=1.0,
                               http_probe=True, http_ports=(fx.port, ipycam.port, free_udp_port()))
    by_url = {c.xaddrs[0]: c for c in found}
    assert len(found) == 2, found
    fixture = by_url[f"http://127.0.0.1:{fx.port}/onvif/device_service"]
    assert fixture.via == ("http",) and fixture.needs_auth and fixture.endpoint is None
    # ipycam answered both ways: one entry, WS-Discovery's fields, the HTTP probe merged in.
    cam = by_url[f"http://127.0.0.1:{ipycam.port}/onvif/device_service"]
    assert cam.via == ("unicast", "http") and cam.name == "ipycam-peer" and cam.needs_auth


async def test_nobody_answers_within_the_timeout() -> None:
    started = time.monotonic()
    found = await discover(multicast=True, interfaces=["127.0.0.1"], port=free_udp_port(),
                           unicast=[f"127.0.0.1:{free_udp_port()}"], timeout_s=0.5)
    assert found == [] and time.monotonic() - started < 3


def test_expand_targets() -> None:
    assert expand_targets(["10.0.0.5"]) == [("10.0.0.5", 3702)]
    assert expand_targets(["10.0.0.5:4000", "cam.local"]) == [("10.0.0.5", 4000), ("cam.local", 3702)]
    assert len(expand_targets(["192.168.1.0/24"])) == 254
    assert expand_targets(["10.0.0.7/32"]) == [("10.0.0.7", 3702)]
    with pytest.raises(ValueError, match="at most 4096"):
        expand_targets(["10.0.0.0/16"])


# ------------------------------------------------------------------------------------------ parser

MATCH = ('<?xml version="1.0"?><e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope" '
         'xmlns:w="http://schemas.xmlsoap.org/ws/2004/08/addressing" '
         'xmlns:d="http://schemas.xmlsoap.org/ws/2005/04/discovery"><e:Body><d:ProbeMatches>{matches}'
         "</d:ProbeMatches></e:Body></e:Envelope>")
ONE = ("<d:ProbeMatch><w:EndpointReference><w:Address>urn:uuid:{uid}</w:Address></w:EndpointReference>"
       "<d:Types>dn:NetworkVideoTransmitter</d:Types><d:Scopes>onvif://www.onvif.org/name/{name} "
       "onvif://www.onvif.org/hardware/DS-2CD2143 onvif://www.onvif.org/location/gate%20north</d:Scopes>"
       "<d:XAddrs>http://10.0.0.{n}/onvif/device_service http://[fe80::1]/onvif/device_service</d:XAddrs>"
       "<d:MetadataVersion>1</d:MetadataVersion></d:ProbeMatch>")


def test_parse_probe_matches_fields() -> None:
    data = MATCH.format(matches=ONE.format(uid="1", name="Gate_Cam", n=5)).encode()
    (cam,) = parse_probe_matches(data, sender="10.0.0.5")
    assert cam.endpoint == "urn:uuid:1" and cam.name == "Gate Cam" and cam.hardware == "DS-2CD2143"
    assert cam.location == "gate north" and cam.address == "10.0.0.5"
    assert cam.xaddrs == ("http://10.0.0.5/onvif/device_service", "http://[fe80::1]/onvif/device_service")


def test_parse_refuses_entities_and_dtds() -> None:
    bomb = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;">]>'
            + MATCH.format(matches=ONE.format(uid="&b;", name="x", n=1)).encode().split(b"?>", 1)[1])
    assert parse_probe_matches(bomb) == []
    external = b'<!DOCTYPE x SYSTEM "http://203.0.113.1/x.dtd"><x/>'
    assert parse_probe_matches(external) == []
    assert parse_device_information(bomb) == (False, {})


def test_parse_bounds_matches_and_nesting() -> None:
    many = MATCH.format(matches="".join(ONE.format(uid=i, name=i, n=i % 250) for i in range(100))).encode()
    assert len(parse_probe_matches(many)) == MAX_MATCHES
    deep = b"<a>" * 5000 + b"</a>" * 5000
    assert parse_probe_matches(deep) == []
    huge = MATCH.format(matches=ONE.format(uid="1", name="n" * 70_000, n=1)).encode()
    assert parse_probe_matches(huge) == []  # larger than any datagram


def test_probe_is_well_formed_and_parses_as_no_match() -> None:
    probe = build_probe("urn:uuid:0")
    assert b"<d:Probe>" in probe and b"NetworkVideoTransmitter" in probe
    assert parse_probe_matches(probe) == []


xml_text = st.text(st.characters(codec="utf-8"), max_size=300)


@st.composite
def xml_docs(draw: st.DrawFn) -> bytes:
    """Random but mostly well-formed documents around the ProbeMatch shape, nested to random depth."""
    tags = st.sampled_from(["d:ProbeMatch", "d:XAddrs", "d:Scopes", "d:Types", "w:EndpointReference", "w:Address",
                            "x", "d:ProbeMatches"])

    def node(depth: int) -> str:
        tag = draw(tags)
        if depth <= 0 or draw(st.booleans()):
            inner = draw(xml_text).replace("&", "&amp;").replace("<", "&lt;")
        else:
            inner = "".join(node(depth - 1) for _ in range(draw(st.integers(0, 3))))
        return f"<{tag}>{inner}</{tag}>"

    body = node(draw(st.integers(0, 40)))
    doc = MATCH.format(matches=body)
    if draw(st.booleans()):  # and sometimes broken
        cut = draw(st.integers(0, len(doc)))
        doc = doc[:cut] + draw(xml_text) + doc[cut:]
    return doc.encode("utf-8", "surrogatepass")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_parser_never_raises_on_bytes(data: bytes) -> None:
    assert isinstance(parse_probe_matches(data, sender="10.0.0.1"), list)
    is_soap, info = parse_device_information(data)
    assert isinstance(is_soap, bool) and isinstance(info, dict)


@settings(max_examples=300, deadline=None)
@given(xml_docs())
def test_parser_never_raises_on_structured_xml(data: bytes) -> None:
    found = parse_probe_matches(data, sender="10.0.0.1")
    assert len(found) <= MAX_MATCHES
    for cam in found:
        assert all(x.startswith(("http://", "https://")) and len(x) <= 512 for x in cam.xaddrs)
        assert cam.name is None or len(cam.name) <= 128


def test_cli_discover_lists_what_answers(ipycam: IpycamPeer) -> None:
    import json

    from tests.helpers import cli

    r = cli("camera", "discover", f"127.0.0.1:{ipycam.discovery_port}", "--no-multicast", "--timeout", "1",
            "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["address"] for row in rows] == ["127.0.0.1"]
    assert rows[0]["xaddrs"] == [f"http://127.0.0.1:{ipycam.port}/onvif/device_service"]
    r = cli("camera", "discover", f"127.0.0.1:{free_udp_port()}", "--no-multicast", "--timeout", "0.5")
    assert r.exit_code == 1 and "no camera answered" in r.output
    r = cli("camera", "discover", "10.0.0.0/33", "--no-multicast")
    assert r.exit_code == 1 and "not a subnet" in r.output
