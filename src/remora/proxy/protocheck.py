"""Refusing what Remora does not implement in an Envoy proto, by path.

Owns: :func:`unpack` (an ``Any`` into its registered message, unknown types refused) and
:func:`check_fields`, the allowlist walk every compiler of Envoy protos uses (bootstrap,
HTTP connection manager and routes, access logs): a set field outside the allowlist of its
message type is a :class:`~remora.errors.BadInput` naming its path
(``unsupported field bootstrap.static_resources.listeners[0].per_connection_buffer_limit_bytes``).
Must not: compile anything; each compiler keeps its own allowlist.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from google.protobuf import symbol_database
from google.protobuf.message import Message

from remora.errors import BadInput

ANY_FIELDS = "*"   # an allowlist entry: every field of this type (its contents are not walked)
Allowlist = Mapping[str, str | frozenset[str]]


def unpack(any_msg: Message, path: str) -> Message:
    """The message inside ``google.protobuf.Any`` (its type must be registered)."""
    type_name = any_msg.type_url.split("/")[-1]
    try:
        cls = symbol_database.Default().GetSymbol(type_name)
    except KeyError:
        raise BadInput(f"unsupported {path}: type {type_name} is not implemented") from None
    msg: Message = cls()
    any_msg.Unpack(msg)
    return msg


def check_fields(msg: Message, path: str, allowed: Allowlist, *,
                 skip_types: Collection[str] = (),
                 skip_fields: Collection[tuple[str, str]] = ()) -> None:
    """Walk ``msg`` and refuse any set field outside ``allowed``. ``skip_types``: message
    types checked by their own compiler; ``skip_fields``: ``(type, field)`` pairs likewise.
    Map fields are skipped (their compilers check the values); ``Any`` is unpacked."""
    name = msg.DESCRIPTOR.full_name
    if name in skip_types:
        return
    fields = allowed.get(name)
    if fields is None:
        raise BadInput(f"unsupported {path}: {name} is not implemented")
    if fields == ANY_FIELDS:
        if name == "google.protobuf.Any":
            check_fields(unpack(msg, path), path, allowed, skip_types=skip_types,
                         skip_fields=skip_fields)
        return
    for fd, value in msg.ListFields():
        where = f"{path}.{fd.name}"
        if fd.name not in fields:
            raise BadInput(f"unsupported field {where} (Remora does not implement it)")
        if fd.message_type is None or (name, fd.name) in skip_fields:
            continue
        if fd.is_repeated:
            if fd.message_type.GetOptions().map_entry:
                continue
            for i, item in enumerate(value):
                check_fields(item, f"{where}[{i}]", allowed, skip_types=skip_types,
                             skip_fields=skip_fields)
        else:
            check_fields(value, where, allowed, skip_types=skip_types,
                         skip_fields=skip_fields)
