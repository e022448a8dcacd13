//! Client certificate identity in QEMU's format.
//!
//! QEMU authorises a client by the string `gnutls_x509_crt_get_dn2()` gives for the subject of
//! its certificate: the RDNs in the order they appear in the certificate (the reverse of
//! RFC 4514, so `C=GB,O=Org,CN=client`), multi-valued RDNs joined with `+`, GnuTLS's short
//! attribute names, RFC 4514 escaping, and `OID=#hex` for values it cannot show as text.

use x509_parser::asn1_rs::Tag;
use x509_parser::prelude::{AttributeTypeAndValue, X509Certificate};

/// GnuTLS's names for the attribute types it knows; others are shown as a dotted OID.
const NAMES: &[(&str, &str)] = &[
    ("2.5.4.6", "C"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.3", "CN"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.9", "street"),
    ("2.5.4.17", "postalCode"),
    ("2.5.4.5", "serialNumber"),
    ("2.5.4.12", "title"),
    ("2.5.4.4", "surName"),
    ("2.5.4.42", "givenName"),
    ("2.5.4.43", "initials"),
    ("2.5.4.44", "generationQualifier"),
    ("2.5.4.46", "dnQualifier"),
    ("2.5.4.65", "pseudonym"),
    ("2.5.4.41", "name"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("0.9.2342.19200300.100.1.1", "UID"),
    ("1.2.840.113549.1.9.1", "EMAIL"),
];

/// The subject of `cert` as QEMU's tls-authz sees it.
pub fn subject(cert: &X509Certificate<'_>) -> String {
    cert.subject()
        .iter()
        .map(|rdn| rdn.iter().map(attribute).collect::<Vec<_>>().join("+"))
        .collect::<Vec<_>>()
        .join(",")
}

fn attribute(attr: &AttributeTypeAndValue<'_>) -> String {
    let oid = attr.attr_type().to_id_string();
    let name = NAMES
        .iter()
        .find(|(known, _)| *known == oid)
        .map(|(_, name)| name.to_string());
    match (name, text_value(attr)) {
        (Some(name), Some(text)) => format!("{name}={}", escape(&text)),
        (name, _) => format!("{}=#{}", name.unwrap_or(oid), der_hex(attr)),
    }
}

/// The value as text, for the string types GnuTLS prints as text.
fn text_value(attr: &AttributeTypeAndValue<'_>) -> Option<String> {
    let value = attr.attr_value();
    match value.tag() {
        Tag::BmpString => {
            let units: Vec<u16> = value
                .data
                .chunks(2)
                .map(|pair| match pair {
                    [hi, lo] => Some(u16::from_be_bytes([*hi, *lo])),
                    _ => None,
                })
                .collect::<Option<_>>()?;
            String::from_utf16(&units).ok()
        }
        Tag::NumericString
        | Tag::PrintableString
        | Tag::Utf8String
        | Tag::Ia5String
        | Tag::T61String
        | Tag::VisibleString => std::str::from_utf8(value.data).ok().map(str::to_string),
        _ => None,
    }
}

/// `#`-form of a value: its whole DER encoding (tag, length, contents) in hex.
fn der_hex(attr: &AttributeTypeAndValue<'_>) -> String {
    let value = attr.attr_value();
    let data = value.data;
    let mut der = vec![value.tag().0 as u8];
    let len = data.len();
    if len < 0x80 {
        der.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        der.push(0x80 | bytes.len() as u8);
        der.extend(bytes);
    }
    der.extend_from_slice(data);
    der.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 4514 escaping, as GnuTLS applies it.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_like_rfc4514() {
        assert_eq!(escape("QSD Test"), "QSD Test");
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape("#x "), "\\#x\\ ");
        assert_eq!(escape(" x\\\"<>;"), "\\ x\\\\\\\"\\<\\>\\;");
        assert_eq!(escape(""), "");
    }
}
