"""Rule text: parsing both forms and printing the kernel's."""

from __future__ import annotations

import pytest

from remora.capture.ruletext import parse_rule
from remora.errors import BadInput

from ...conformance.corpus import cases, config_for, load

KERNEL_FORM = [
    # Istio input form -> what iptables-save prints (checked against the kernel in
    # tests/netns/test_trace_kernel.py for whole rule sets).
    ("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 "
     "-m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
     "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m multiport ! --dports 53,15008 "
     "-m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"),
    ("-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff "
     "--on-port 15006",
     "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 "
     "--tproxy-mark 0x539/0xffffffff"),
    ("-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338",
     "-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j MARK "
     "--set-xmark 0x53a/0xffffffff"),
    ("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 127.0.0.53/32 -j REDIRECT --to-port 15053",
     "-A ISTIO_OUTPUT_DNS -d 127.0.0.53/32 -p udp -m udp --dport 53 -j REDIRECT "
     "--to-ports 15053"),
    ("-A ISTIO_OUTPUT -d 10.1.2.3/8 -j RETURN", "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN"),
    ("-A X -m comment --comment \"a b\" -j ACCEPT", "-A X -m comment --comment \"a b\" -j ACCEPT"),
]


@pytest.mark.parametrize(("given", "kernel"), KERNEL_FORM)
def test_prints_the_kernel_form(given: str, kernel: str) -> None:
    rule = parse_rule(given)
    assert rule.text == kernel
    assert parse_rule(kernel).text == kernel  # the kernel form is a fixed point
    assert rule.unknown == ()


def test_every_corpus_rule_is_modelled() -> None:
    from remora.capture.rules import build_rules

    for path in cases():
        rules = build_rules(config_for(load(path)))
        for op in (*rules.v4, *rules.v6):
            parsed = parse_rule(op.spec)
            assert parsed.unknown == (), (path.stem, op.spec)
            assert parse_rule(parsed.text).text == parsed.text


def test_unknown_parts_are_kept_not_guessed() -> None:
    rule = parse_rule("-A X -p tcp -m statistic --mode random --probability 0.5 -j ACCEPT")
    assert rule.unknown == ("-m statistic --mode random --probability 0.5",)
    rule = parse_rule("-A X -j DNAT --to-destination 1.2.3.4:80")
    assert rule.unknown == ("-j DNAT --to-destination 1.2.3.4:80",)


@pytest.mark.parametrize("bad", ["-A X -s 300.1.1.1 -j RETURN", "-A X -p tcp --dport x -j DROP",
                                 "-A X -m mark --mark zz -j RETURN", "-A X -s", "-A 'X"])
def test_bad_rules_are_errors(bad: str) -> None:
    with pytest.raises(BadInput):
        parse_rule(bad)
