#!/usr/bin/env python3
"""Writes the seed corpora of the byte-input targets (corpus/ is not committed):
realistic request heads and pipelines, server responses (chunked, trailers, interim
heads, ambiguous framing), and the repository's configs. Run from fuzz/: python3 seed_corpus.py
The arbitrary-typed targets (chunked_roundtrip, forwarded, route_paths) start empty."""
import glob, os, re

def put(target, name, data):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    with open(f"corpus/{target}/{name}", "wb") as f:
        f.write(data)

HEADS = [
    b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n",
    b"GET /fhir/Patient?_count=2 HTTP/1.1\r\nUser-Agent: probe/1\r\nHOST: fhir.example\r\naccept:application/fhir+json\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\nContent-Length: 0\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\nCookie: a=1\r\n"
    b"Authorization:  Bearer t \r\ncookie: b=2\r\n\r\n",
    b"GET / HTTP/1.1\nhost: x\nx-FORWARDED-for: 6.6.6.6\ncontent-LENGTH: 0\nX-E:\nX-F:   \nX-T:\tv\t\nX-O: caf\xe9\n\n",
    b"GET /one HTTP/1.1\r\nHost: app.test\r\n\r\nPOST /two HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello"
    b"GET /three HTTP/1.1\r\nHost: app.test\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
    b"HEAD /c HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: TE\r\n\r\n",
    b"\r\n\r\nGET / HTTP/1.2\r\nHost: a\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 0\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: +0\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://a.example:8080/p?q HTTP/1.1\r\nHost: a.example\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\nX-Real-IP: 1.1.1.1\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /%2e%2e/x#frag HTTP/1.1\r\nHost: a\r\n\r\n",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 42\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 599 \r\nConnection: X-Private, keep-alive\r\nX-Private: 1\r\nX-Mixed-Case: a\r\nSet-Cookie: a=1\r\nset-cookie:b=2\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nx-a: 1\r\nx-b: 2\r\n\r\nHTTP/1.1 200 OK\r\n",
]
# front_parse: max_head selector, tune, two seed bytes for the read sizes, then the stream.
for i, head in enumerate(HEADS):
    for j, params in enumerate([b"\x00\x00\x00\x01", b"\x01\x00\x13\x37", b"\x02\x08\x00\x05", b"\x03\x20\x01\x00"]):
        put("front_parse", f"seed{i:02}_{j}", params + head)
# h1_response: method selector, two seed bytes for the read sizes, then the stream.
for i, resp in enumerate(RESPONSES):
    for j, params in enumerate([b"\x00\x00\x01", b"\x01\x13\x37", b"\x02\x00\x05"]):
        put("h1_response", f"seed{i:02}_{j}", params + resp)
# config_parse: the configs of the repository and the README's TOML blocks.
for path in glob.glob("../config/*.toml") + glob.glob("../config/examples/*.toml"):
    put("config_parse", os.path.basename(path), open(path, "rb").read())
for i, block in enumerate(re.findall(r"```toml\n(.*?)```", open("../README.md").read(), re.S)):
    put("config_parse", f"readme{i:02}.toml", block.encode())
for path in glob.glob("../tests/*.rs"):
    for i, block in enumerate(re.findall(r'r#"(\s*\[.*?)"#', open(path).read(), re.S)):
        if "=" in block:
            put("config_parse", f"{os.path.basename(path)}_{i}.toml", block.encode())
put("config_parse", "env", b"SWARMGATE_LISTEN_HTTP=127.0.0.1:1\nSWARMGATE_UPSTREAM_DEMO_RETRIES=3\n"
    b"SWARMGATE_UPSTREAM_NOPE_SERVERS=1.1.1.1:1\n\0" + open("../config/swarmgate.toml", "rb").read())
