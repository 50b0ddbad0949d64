"""Finding ONVIF cameras: WS-Discovery by multicast, unicast WS-Discovery probes of a host or a subnet,
and an optional HTTP probe of the device service for cameras that ignore WS-Discovery (some Hikvision).

Our own asyncio UDP, not the ``wsdiscovery`` package (it skips loopback interfaces and its unicast probe
reads from the wrong socket): one socket per interface sends the Probe and receives the ProbeMatches on
that same socket.

Wire (SOAP 1.2 over UDP, WS-Discovery 2005/04, WS-Addressing 2004/08)::

    -> 239.255.255.250:3702 (or a host:3702)   Probe            Types = dn:NetworkVideoTransmitter | tds:Device
    <- from the camera, to our socket          ProbeMatches     ProbeMatch* { EndpointReference/Address,
                                                                Types, Scopes, XAddrs, MetadataVersion }

Policies:
- ProbeMatches parsing (:func:`parse_probe_matches`) is a codec over untrusted datagrams: no DTD, no entity
  expansion, no network, no huge trees (lxml with ``resolve_entities=False``, ``no_network=True``; any
  DOCTYPE is refused outright), at most :data:`MAX_DATAGRAM` bytes, :data:`MAX_MATCHES` matches and capped
  strings; anything malformed gives ``[]``, never an exception. ``ProbeMatch`` is accepted with or without
  its ``ProbeMatches`` wrapper (ipycam omits it).
- Unicast scans are bounded: at most :data:`MAX_SCAN_HOSTS` addresses per call, datagrams sent in paced
  batches, HTTP probes at most ``concurrency`` at a time, each within ``timeout_s``.
- Multicast goes out on every IPv4 interface that is up and multicast-capable (or the ``interfaces`` given,
  by address: ``127.0.0.1`` reaches a camera simulator on this box), TTL 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import socket
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aiohttp
from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type information

log = logging.getLogger(__name__)

MULTICAST_GROUP = "239.255.255.250"
WSD_PORT = 3702
MAX_DATAGRAM = 65_535
MAX_MATCHES = 16
MAX_SCAN_HOSTS = 4096
MAX_FIELD = 512
MAX_ITEMS = 32
_SEND_BATCH = 128

_SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
_WSA = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
_WSD = "http://schemas.xmlsoap.org/ws/2005/04/discovery"
_DN = "http://www.onvif.org/ver10/network/wsdl"
_TDS = "http://www.onvif.org/ver10/device/wsdl"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, load_dtd=False,
                          dtd_validation=False, remove_comments=True, remove_pis=True)

Via = Literal["multicast", "unicast", "http"]


@dataclass(frozen=True, slots=True)
class DiscoveredCamera:
    """A device that answered. ``address`` is the IP it answered from (or the host probed over HTTP)."""

    address: str
    xaddrs: tuple[str, ...] = ()
    endpoint: str | None = None  # EndpointReference, e.g. urn:uuid:...
    name: str | None = None
    hardware: str | None = None
    location: str | None = None
    types: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    via: tuple[Via, ...] = ()
    manufacturer: str | None = None  # from the HTTP probe, when the camera answers it without credentials
    model: str | None = None
    needs_auth: bool = False  # the HTTP probe got 'not authorized': an ONVIF device, credentials needed


def build_probe(message_id: str, types: str = "dn:NetworkVideoTransmitter") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="{_SOAP12}" xmlns:a="{_WSA}" '
            f'xmlns:d="{_WSD}" xmlns:dn="{_DN}" xmlns:tds="{_TDS}"><s:Header>'
            f"<a:Action s:mustUnderstand=\"1\">{_WSD}/Probe</a:Action><a:MessageID>{message_id}</a:MessageID>"
            "<a:ReplyTo><a:Address>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:Address>"
            '</a:ReplyTo><a:To s:mustUnderstand="1">urn:schemas-xmlsoap-org:ws:2005:04:discovery</a:To>'
            f"</s:Header><s:Body><d:Probe><d:Types>{types}</d:Types></d:Probe></s:Body></s:Envelope>"
            ).encode()


def _local(tag: Any) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _words(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(w[:MAX_FIELD] for w in text.split()[:MAX_ITEMS])


def _scope(scopes: Iterable[str], kind: str) -> str | None:
    prefix = f"onvif://www.onvif.org/{kind}/"
    for s in scopes:
        if s.lower().startswith(prefix):
            value = unquote(s[len(prefix):]).replace("_", " ").strip()
            return value[:128] or None
    return None


def parse_probe_matches(data: bytes, *, sender: str = "") -> list[DiscoveredCamera]:
    """ProbeMatches datagram -> cameras; [] when it is not one (or malformed). Never raises."""
    if not data or len(data) > MAX_DATAGRAM or b"<!DOCTYPE" in data.upper() or b"<!ENTITY" in data.upper():
        return []
    try:
        root = etree.fromstring(data, _PARSER)
    except (etree.XMLSyntaxError, ValueError):
        return []
    if root is None:
        return []
    out: list[DiscoveredCamera] = []
    try:
        for el in root.iter():
            if _local(el.tag) != "ProbeMatch":
                continue
            fields: dict[str, str] = {}
            endpoint = None
            for child in el.iterchildren():
                name = _local(child.tag)
                if name == "EndpointReference":
                    address = next((c for c in child.iterchildren() if _local(c.tag) == "Address"), None)
                    if address is not None and address.text:
                        endpoint = address.text.strip()[:MAX_FIELD]
                elif name in ("Types", "Scopes", "XAddrs") and isinstance(child.text, str):
                    fields[name] = child.text[: MAX_FIELD * MAX_ITEMS]
            xaddrs = tuple(x for x in _words(fields.get("XAddrs")) if x.lower().startswith(("http://", "https://")))
            scopes = _words(fields.get("Scopes"))
            if not xaddrs and endpoint is None:
                continue
            address = sender[:64] or (_host(xaddrs[0]) if xaddrs else "")
            out.append(DiscoveredCamera(
                address=address, xaddrs=xaddrs, endpoint=endpoint,
                name=_scope(scopes, "name"), hardware=_scope(scopes, "hardware"),
                location=_scope(scopes, "location"), types=_words(fields.get("Types")), scopes=scopes))
            if len(out) >= MAX_MATCHES:
                break
    except (ValueError, RecursionError):
        return []
    return out


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


# ---------------------------------------------------------------------------------------- interfaces

_SIOCGIFFLAGS = 0x8913
_SIOCGIFADDR = 0x8915
_IFF_UP, _IFF_LOOPBACK, _IFF_MULTICAST = 0x1, 0x8, 0x1000


def multicast_interfaces() -> list[str]:
    """IPv4 addresses of the interfaces that are up, not loopback and multicast-capable (Linux)."""
    out: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack("H", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req)[16:18])[0]
                if not flags & _IFF_UP or flags & _IFF_LOOPBACK or not flags & _IFF_MULTICAST:
                    continue
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
            except OSError:
                continue  # no IPv4 address on it
            out.append(addr)
    return out


# ---------------------------------------------------------------------------------------- UDP probing

class _Collector(asyncio.DatagramProtocol):
    def __init__(self, via: Via) -> None:
        self.via: Via = via
        self.found: list[DiscoveredCamera] = []
        self.datagrams = 0

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.datagrams += 1
        for cam in parse_probe_matches(data, sender=str(addr[0])):
            self.found.append(_with_via(cam, self.via))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from scanned hosts lands here: expected during a subnet scan.
        log.debug("discovery: %s", exc)


def _with_via(cam: DiscoveredCamera, via: Via) -> DiscoveredCamera:
    return replace(cam, via=(via,))


def _probes() -> list[bytes]:
    # Two probes: some NVRs answer only tds:Device, most cameras dn:NetworkVideoTransmitter.
    return [build_probe(f"urn:uuid:{uuid.uuid4()}", t) for t in ("dn:NetworkVideoTransmitter", "tds:Device")]


async def _multicast(interface: str, port: int, timeout_s: float) -> list[DiscoveredCamera]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        sock.bind((interface, 0))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        log.info("discovery: multicast on %s unavailable: %s", interface, exc)
        return []
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: _Collector("multicast"), sock=sock)
    try:
        for probe in _probes():
            transport.sendto(probe, (MULTICAST_GROUP, port))
        await asyncio.sleep(timeout_s)
    finally:
        transport.close()
    return proto.found


def expand_targets(targets: Sequence[str], default_port: int = WSD_PORT) -> list[tuple[str, int]]:
    """'10.0.0.5', '10.0.0.5:3702', '10.0.0.0/24', 'cam.local' -> (host, port) pairs; at most
    MAX_SCAN_HOSTS (ValueError beyond: scan a smaller subnet)."""
    out: list[tuple[str, int]] = []
    for raw in targets:
        target = raw.strip()
        host, port = target, default_port
        if target.count(":") == 1 and "/" not in target.split(":", 1)[1]:
            host, _, p = target.partition(":")
            port = int(p)
        if "/" in host:
            net = ipaddress.ip_network(host, strict=False)
            if net.num_addresses > MAX_SCAN_HOSTS + 2:
                raise ValueError(f"{target}: {net.num_addresses} addresses; scan at most {MAX_SCAN_HOSTS} at once")
            hosts = [str(h) for h in net.hosts()] if net.num_addresses > 1 else [str(net.network_address)]
            out.extend((h, port) for h in hosts)
        else:
            out.append((host, port))
        if len(out) > MAX_SCAN_HOSTS:
            raise ValueError(f"more than {MAX_SCAN_HOSTS} hosts to probe; narrow the targets")
    return out


async def _unicast(targets: Sequence[tuple[str, int]], timeout_s: float,
                   bind: str = "0.0.0.0") -> list[DiscoveredCamera]:  # noqa: S104  # answers come from the LAN
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: _Collector("unicast"), local_addr=(bind, 0),
                                                           family=socket.AF_INET)
    try:
        probes = _probes()
        for i, (host, port) in enumerate(targets):
            for probe in probes:
                with contextlib.suppress(OSError):
                    transport.sendto(probe, (host, port))
            if i % _SEND_BATCH == _SEND_BATCH - 1:
                await asyncio.sleep(0.01)  # pace a subnet scan instead of bursting thousands of datagrams
        await asyncio.sleep(timeout_s)
    finally:
        transport.close()
    return proto.found


# ---------------------------------------------------------------------------------------- HTTP probing

_DEVICE_INFO = (f'<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="{_SOAP12}" xmlns:tds="{_TDS}">'
                "<s:Body><tds:GetDeviceInformation/></s:Body></s:Envelope>").encode()


def parse_device_information(data: bytes) -> tuple[bool, dict[str, str]]:
    """(is it a SOAP answer, {Manufacturer, Model, ...}) from a GetDeviceInformation reply. Never raises."""
    if not data or len(data) > MAX_DATAGRAM or b"<!DOCTYPE" in data.upper() or b"<!ENTITY" in data.upper():
        return False, {}
    try:
        root = etree.fromstring(data, _PARSER)
    except (etree.XMLSyntaxError, ValueError):
        return False, {}
    if root is None or _local(root.tag) != "Envelope":
        return False, {}
    info: dict[str, str] = {}
    for el in root.iter():
        if _local(el.tag) == "GetDeviceInformationResponse":
            for child in el.iterchildren():
                if isinstance(child.text, str):
                    info[_local(child.tag)] = child.text.strip()[:128]
    return True, info


async def _http_probe(session: aiohttp.ClientSession, host: str, port: int, sem: asyncio.Semaphore,
                      timeout_s: float) -> DiscoveredCamera | None:
    url = f"http://{host}:{port}/onvif/device_service" if port != 80 else f"http://{host}/onvif/device_service"
    async with sem:
        try:
            async with asyncio.timeout(timeout_s), session.post(
                    url, data=_DEVICE_INFO, headers={"Content-Type": "application/soap+xml; charset=utf-8"},
                    allow_redirects=False) as resp:
                status = resp.status
                body = await resp.content.read(MAX_DATAGRAM + 1)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
    is_soap, info = parse_device_information(body)
    if not is_soap and status != 401:
        return None
    return DiscoveredCamera(address=host, xaddrs=(url,), via=("http",), manufacturer=info.get("Manufacturer"),
                            model=info.get("Model"), needs_auth=not info)


# ---------------------------------------------------------------------------------------- entry point

def _merge(found: Iterable[DiscoveredCamera]) -> list[DiscoveredCamera]:
    merged: dict[str, DiscoveredCamera] = {}
    for cam in found:
        key = cam.endpoint or (cam.xaddrs[0] if cam.xaddrs else cam.address)
        if cam.via == ("http",):  # the same device service already announced over WS-Discovery?
            key = next((k for k, c in merged.items() if cam.xaddrs[0] in c.xaddrs), key)
        old = merged.get(key)
        if old is None:
            merged[key] = cam
            continue
        via = tuple(dict.fromkeys((*old.via, *cam.via)))
        merged[key] = DiscoveredCamera(
            address=old.address, xaddrs=old.xaddrs or cam.xaddrs, endpoint=old.endpoint or cam.endpoint,
            name=old.name or cam.name, hardware=old.hardware or cam.hardware, location=old.location or cam.location,
            types=old.types or cam.types, scopes=old.scopes or cam.scopes, via=via,
            manufacturer=old.manufacturer or cam.manufacturer, model=old.model or cam.model,
            needs_auth=(old.needs_auth or cam.needs_auth) and not (old.manufacturer or cam.manufacturer))
    return sorted(merged.values(), key=lambda c: (_sort_ip(c.address), c.xaddrs))


def _sort_ip(address: str) -> tuple[int, str]:
    try:
        return int(ipaddress.ip_address(address)), ""
    except ValueError:
        return 1 << 129, address


async def discover(multicast: bool = True, unicast: Sequence[str] = (), timeout_s: float = 3.0, *,
                   interfaces: Sequence[str] | None = None, port: int = WSD_PORT, http_probe: bool = False,
                   http_ports: Sequence[int] = (80,), concurrency: int = 64) -> list[DiscoveredCamera]:
    """Cameras that answer within ``timeout_s``: WS-Discovery by multicast (on ``interfaces``, by address),
    unicast probes of ``unicast`` targets (hosts, host:port, CIDR subnets), and with ``http_probe`` a
    GetDeviceInformation POST to each unicast host's device service on ``http_ports``. Merged per device."""
    targets = expand_targets(unicast, port)
    jobs: list[asyncio.Task[list[DiscoveredCamera]]] = []
    async with asyncio.TaskGroup() as tg:
        if multicast:
            for iface in (interfaces if interfaces is not None else multicast_interfaces()):
                jobs.append(tg.create_task(_multicast(iface, port, timeout_s)))
        if targets:
            jobs.append(tg.create_task(_unicast(targets, timeout_s)))
        if http_probe and targets:
            jobs.append(tg.create_task(_http_all(sorted({h for h, _ in targets}), http_ports, timeout_s,
                                                 concurrency)))
    return _merge(c for job in jobs for c in job.result())


async def _http_all(hosts: Sequence[str], ports: Sequence[int], timeout_s: float,
                    concurrency: int) -> list[DiscoveredCamera]:
    sem = asyncio.Semaphore(max(1, concurrency))
    connector = aiohttp.TCPConnector(limit=max(1, concurrency))
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(_http_probe(session, h, p, sem, timeout_s) for h in hosts for p in ports))
    return [r for r in results if r is not None]
