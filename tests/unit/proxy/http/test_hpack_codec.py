"""HPACK (RFC 7541): the examples of its Appendix C, interop both ways with the ``hpack``
package, and every decoding error a peer can cause."""

from __future__ import annotations

import hpack
import pytest
from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.struct import NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from remora.proxy.http.hpack_codec import (
    Decoder,
    Encoder,
    huffman_decode,
    huffman_encode,
    huffman_encoded_length,
)

H = bytes.fromhex

# RFC 7541 C.3 (requests, plain strings), C.4 (the same with Huffman), C.5 (responses, table
# size 256, plain), C.6 (C.5 with Huffman): each a sequence on one connection, with the dynamic
# table's size after each block.
_REQ1 = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
         (b":authority", b"www.example.com")]
_REQ2 = [*_REQ1, (b"cache-control", b"no-cache")]
_REQ3 = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
         (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]
_RESP1 = [(b":status", b"302"), (b"cache-control", b"private"),
          (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"), (b"location", b"https://www.example.com")]
_RESP2 = [(b":status", b"307"), *_RESP1[1:]]
_RESP3 = [(b":status", b"200"), (b"cache-control", b"private"),
          (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"), (b"location", b"https://www.example.com"),
          (b"content-encoding", b"gzip"),
          (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")]

RFC_SEQUENCES = {
    "C.3": (4096, [
        ("828684410f7777772e6578616d706c652e636f6d", _REQ1, 57),
        ("828684be58086e6f2d6361636865", _REQ2, 110),
        ("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565", _REQ3, 164)]),
    "C.4": (4096, [
        ("828684418cf1e3c2e5f23a6ba0ab90f4ff", _REQ1, 57),
        ("828684be5886a8eb10649cbf", _REQ2, 110),
        ("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf", _REQ3, 164)]),
    "C.5": (256, [
        ("4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a3133"
         "3a323120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d", _RESP1, 222),
        ("4803333037c1c0bf", _RESP2, 222),
        ("88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a"
         "69707738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d"
         "61782d6167653d333630303b2076657273696f6e3d31", _RESP3, 215)]),
    "C.6": (256, [
        ("488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d"
         "29ad171863c78f0b97c8e9ae82ae43d3", _RESP1, 222),
        ("4883640effc1c0bf", _RESP2, 222),
        ("88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821d"
         "d7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b106"
         "3d5007", _RESP3, 215)]),
}


@pytest.mark.parametrize("name", sorted(RFC_SEQUENCES))
def test_rfc7541_appendix_c_decodes(name: str) -> None:
    size, blocks = RFC_SEQUENCES[name]
    dec = Decoder()
    dec.max_allowed_table_size = size
    first = True
    for hexblock, headers, table_size in blocks:
        block = H(hexblock)
        if first and size != 4096:
            block = b"\x3f\xe1\x01" + block     # size update to 256 (31 + 225)
            first = False
        assert dec.decode(block) == headers
        assert dec._size == table_size


def test_rfc7541_requests_encode_as_in_appendix_c4() -> None:
    """Our choices (index what is in a table, add the rest, Huffman when shorter) give the
    RFC's own encoding of its request examples, octet for octet."""
    enc = Encoder()
    for hexblock, headers, _ in RFC_SEQUENCES["C.4"][1]:
        assert enc.encode(headers).hex() == hexblock


def test_huffman_matches_the_rfc_code() -> None:
    assert huffman_encode(b"www.example.com") == H("f1e3c2e5f23a6ba0ab90f4ff")   # C.4.1
    assert huffman_encode(b"no-cache") == H("a8eb10649cbf")                      # C.4.2
    assert huffman_decode(H("a8eb10649cbf")) == b"no-cache"
    assert huffman_encoded_length(b"custom-key") == len(H("25a849e95ba97d7f"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_huffman_round_trip_and_agrees_with_hpack(data: bytes) -> None:
    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
    ours = huffman_encode(data)
    assert ours == HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(data)
    assert len(ours) == huffman_encoded_length(data)
    assert huffman_decode(ours) == data


def test_huffman_refuses_eos_and_bad_padding() -> None:
    assert huffman_decode(b"\x1f") == b"a"      # 'a' is 00011, then 111 pads
    with pytest.raises(HPACKDecodingError):
        huffman_decode(b"\x1e")                 # padding with a zero in it
    with pytest.raises(HPACKDecodingError):
        huffman_decode(b"\xff")                 # eight bits of padding
    with pytest.raises(HPACKDecodingError):
        huffman_decode(b"\xff\xff\xff\xff")     # EOS itself (30 ones)


def test_huffman_padding_of_exactly_seven_ones_is_fine_eight_is_not() -> None:
    one = huffman_encode(b"0")          # '0' is 00000 (5 bits) + 111 padding
    assert len(one) == 1 and huffman_decode(one) == b"0"
    with pytest.raises(HPACKDecodingError):
        huffman_decode(one + b"\xff")   # a whole octet of padding


header = st.tuples(
    st.sampled_from([b":status", b"content-type", b"x-request-id", b"cookie", b"authorization",
                     b"date", b"x-custom", b"set-cookie"]),
    st.binary(max_size=80))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(header, max_size=12), max_size=8),
       st.sampled_from([4096, 256, 0, 100]))
def test_interop_with_hpack_both_ways(blocks: list[list[tuple[bytes, bytes]]],
                                      size: int) -> None:
    """Our encoder → hpack's decoder, and hpack's encoder → our decoder, over a connection's
    worth of blocks (the dynamic tables must stay in step), with a table size change."""
    ours_enc, their_dec = Encoder(), hpack.Decoder()
    their_enc, ours_dec = hpack.Encoder(), Decoder()
    for i, headers in enumerate(blocks):
        if i == 2:
            ours_enc.header_table_size = size
            their_enc.header_table_size = size
        assert [tuple(h) for h in their_dec.decode(ours_enc.encode(headers), raw=True)] \
            == headers
        assert ours_dec.decode(their_enc.encode(headers)) == headers


def test_credentials_are_never_indexed() -> None:
    enc, dec = Encoder(), hpack.Decoder()
    got = dec.decode(enc.encode([(b"authorization", b"Bearer x"), (b"cookie", b"a=b"),
                                 (b"cookie", b"a-long-cookie-value-0123456789"),
                                 (b"proxy-authorization", b"Basic y"), (b"x-other", b"z")]),
                     raw=True)
    never = [h[0] for h in got if isinstance(h, NeverIndexedHeaderTuple)]
    assert never == [b"authorization", b"cookie", b"proxy-authorization"]
    assert enc._names == [b"cookie", b"x-other"]     # the long cookie and x-other: indexed
    # and one marked never-indexed by the caller stays so
    got = dec.decode(enc.encode([NeverIndexedHeaderTuple(b"x-secret", b"1")]), raw=True)
    assert isinstance(got[0], NeverIndexedHeaderTuple)


def test_repeated_fields_cost_one_octet() -> None:
    enc = Encoder()
    fields = [(b"content-type", b"application/grpc"), (b"grpc-status", b"0")]
    enc.encode(fields)
    assert len(enc.encode(fields)) == 2


def test_table_size_change_is_announced_smallest_then_final() -> None:
    enc = Encoder()
    enc.encode([(b"x-a", b"1")])
    enc.header_table_size = 0          # the peer shrank the table, then grew it again
    enc.header_table_size = 2048
    block = enc.encode([(b"x-b", b"2")])
    assert block[:1] == b"\x20"                     # size 0 first
    assert block[1:4] == bytes([0x3F, 0xE1, 0x0F])  # then 2048 (31 + 2017)
    dec = hpack.Decoder()
    dec.decode(enc.encode([]), raw=True)            # nothing pending twice
    assert enc.encode([]) == b""


def test_entry_larger_than_the_table_is_sent_without_indexing() -> None:
    enc, dec = Encoder(), Decoder()
    big = (b"x-big", b"v" * 5000)
    assert dec.decode(enc.encode([big])) == [big]
    assert enc._names == [] and dec._names == []


@pytest.mark.parametrize("block, error", [
    (b"\x80", InvalidTableIndex),                       # index 0
    (b"\xbe", InvalidTableIndex),                       # 62: the dynamic table is empty
    (b"\xff\x80\x80\x80\x80\x80\x01", HPACKDecodingError),   # integer too long
    (b"\xff", HPACKDecodingError),                      # integer cut short
    (b"\x40\x05ab", HPACKDecodingError),                # name shorter than its length
    (b"\x40", HPACKDecodingError),                      # literal with nothing after it
    (b"\x82\x20", HPACKDecodingError),                  # size update after a field
    (b"\x3f\xe2\x1f", InvalidTableSizeError),           # size update to 4097
    (b"\x40\x81\xff\x01a", HPACKDecodingError),         # Huffman name: 8 bits of padding
])
def test_decoding_errors(block: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        Decoder().decode(block)


def test_header_list_size_is_bounded_as_it_grows() -> None:
    dec = Decoder(max_header_list_size=100)
    assert dec.decode(b"\x82") == [(b":method", b"GET")]        # 7 + 3 + 32
    with pytest.raises(OversizedHeaderListError):
        dec.decode(b"\x82\x82\x82")                             # 126 > 100
    enc = Encoder()
    with pytest.raises(OversizedHeaderListError):
        Decoder(max_header_list_size=1000).decode(enc.encode([(b"x", b"v" * 2000)]))


def test_decoder_table_shrinks_and_evicts() -> None:
    enc, dec = hpack.Encoder(), Decoder()
    dec.decode(enc.encode([(b"x-a", b"1"), (b"x-b", b"2")]))
    assert dec._size == 2 * (3 + 1 + 32)
    enc.header_table_size = 40            # room for one
    assert dec.decode(enc.encode([(b"x-c", b"3")])) == [(b"x-c", b"3")]
    assert dec._names == [b"x-c"] and dec.header_table_size == 40


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=4))
def test_any_bytes_decode_or_raise_an_hpack_error(blocks: list[bytes]) -> None:
    """Whatever a peer sends, the decoder returns fields or raises one of hpack's decoding
    errors (which h2 turns into a connection error), block after block on one context."""
    dec = Decoder(max_header_list_size=1000)
    for block in blocks:
        try:
            fields = dec.decode(block)
        except HPACKDecodingError:
            continue
        assert all(type(n) is bytes and type(v) is bytes for n, v in fields)
        assert dec._size <= dec.header_table_size


def test_a_peer_cannot_make_the_encoder_table_larger_than_4k() -> None:
    """SETTINGS_HEADER_TABLE_SIZE is a limit, not a demand: we keep 4 KiB at most, so a peer
    allowing 4 GiB cannot make us hold every field we ever send."""
    enc, dec = Encoder(), hpack.Decoder()
    dec.max_allowed_table_size = 2**32 - 1
    enc.header_table_size = 2**32 - 1
    assert enc.header_table_size == 4096
    for i in range(2000):
        fields = [(b"x-request-id", b"%032d" % i)]
        assert [tuple(h) for h in dec.decode(enc.encode(fields), raw=True)] == fields
    assert enc._size <= 4096 and len(enc._names) < 100
