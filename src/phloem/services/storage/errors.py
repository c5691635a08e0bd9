"""S3 errors and the XML documents of responses.

    raise S3Error("NoSuchKey", "The specified key does not exist.", key="a/b.png")
    body = exc.to_xml(resource="/images/a/b.png", request_id="3f9a...")

The status of each code is the one S3 answers with, so SDKs map them to the same
exceptions (``NoSuchKey``, ``SignatureDoesNotMatch``, ...) and retry only what S3's
clients retry. ``QuotaExceeded`` (507) is phloem's own: a branch's storage quota is full.
"""

from __future__ import annotations

from xml.etree import ElementTree as ET

STATUS = {
    "AccessDenied": 403,
    "AuthorizationHeaderMalformed": 400,
    "AuthorizationQueryParametersError": 400,
    "BadDigest": 400,
    "BucketAlreadyOwnedByYou": 409,
    "EntityTooLarge": 400,
    "EntityTooSmall": 400,
    "IncompleteBody": 400,
    "InvalidAccessKeyId": 403,
    "InvalidArgument": 400,
    "InvalidBucketName": 400,
    "InvalidDigest": 400,
    "InvalidPart": 400,
    "InvalidPartOrder": 400,
    "InvalidRange": 416,
    "InvalidRequest": 400,
    "InvalidURI": 400,
    "KeyTooLongError": 400,
    "MalformedXML": 400,
    "MetadataTooLarge": 400,
    "MethodNotAllowed": 405,
    "MissingContentLength": 411,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "NoSuchUpload": 404,
    "NotImplemented": 501,
    "PreconditionFailed": 412,
    "QuotaExceeded": 507,
    "RequestTimeTooSkewed": 403,
    "SignatureDoesNotMatch": 403,
    "XAmzContentSHA256Mismatch": 400,
    "InternalError": 500,
}


class S3Error(Exception):
    """An error answered as S3 does: ``status`` and an ``<Error>`` document."""

    def __init__(self, code: str, message: str, **fields: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = STATUS[code]
        self.fields = fields

    def to_xml(self, resource: str, request_id: str) -> bytes:
        root = ET.Element("Error")
        ET.SubElement(root, "Code").text = self.code
        ET.SubElement(root, "Message").text = self.message
        for name, value in self.fields.items():
            ET.SubElement(root, "".join(p.capitalize() for p in name.split("_"))).text = value
        ET.SubElement(root, "Resource").text = resource
        ET.SubElement(root, "RequestId").text = request_id
        return document(root)


NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def element(tag: str, children: dict[str, str | None] | None = None) -> ET.Element:
    """``<tag>`` with simple text children, skipping ``None`` values."""
    el = ET.Element(tag)
    for name, value in (children or {}).items():
        if value is not None:
            ET.SubElement(el, name).text = value
    return el


def document(root: ET.Element, namespaced: bool = False) -> bytes:
    if namespaced:
        root.set("xmlns", NS)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body


def parse_xml(body: bytes, root_tag: str) -> ET.Element:
    """Parse a client's XML document whose root is ``root_tag`` (namespace optional);
    namespaces are stripped from every tag."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise S3Error("MalformedXML", f"The XML you provided was not well-formed: {exc}") \
            from None
    for el in root.iter():
        if el.tag.startswith("{"):
            el.tag = el.tag.split("}", 1)[1]
    if root.tag != root_tag:
        raise S3Error("MalformedXML", f"the document's root must be <{root_tag}>, "
                      f"got <{root.tag}>")
    return root
