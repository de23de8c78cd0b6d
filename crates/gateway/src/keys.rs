//! Public keys in PEM, as consumers' `jwt_secrets` give them: checked when the config loads,
//! turned into what ring verifies with when the JWT plugin prepares its credentials.

use base64::{engine::general_purpose::STANDARD, Engine};
use bazaar_trust::der;

/// Turns an RSA public key PEM (`PUBLIC KEY` or `RSA PUBLIC KEY`) into the PKCS#1 DER ring uses.
pub(crate) fn rsa_public_key_der(pem: &str) -> Result<Vec<u8>, String> {
    let der = pem_der(pem)?;
    if pem.contains("BEGIN RSA PUBLIC KEY") {
        return Ok(der);
    }
    subject_public_key(&der)
}

/// The raw 32-byte key of an Ed25519 `PUBLIC KEY` PEM.
pub(crate) fn ed25519_public_key(pem: &str) -> Result<Vec<u8>, String> {
    let key = subject_public_key(&pem_der(pem)?)?;
    if key.len() == 32 {
        Ok(key)
    } else {
        Err("expected an Ed25519 public key (32 bytes)".into())
    }
}

fn pem_der(pem: &str) -> Result<Vec<u8>, String> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect();
    STANDARD.decode(body).map_err(|e| format!("not a PEM: {e}"))
}

/// The key bits of a DER SubjectPublicKeyInfo.
fn subject_public_key(der: &[u8]) -> Result<Vec<u8>, String> {
    // SubjectPublicKeyInfo ::= SEQUENCE { algorithm SEQUENCE, subjectPublicKey BIT STRING }.
    let (tag, spki, _) = der::element(der).ok_or("malformed DER")?;
    if tag != 0x30 {
        return Err("expected a SubjectPublicKeyInfo sequence".into());
    }
    let (_, _, rest) = der::element(spki).ok_or("malformed DER")?;
    let (tag, bits, _) = der::element(rest).ok_or("malformed DER")?;
    match (tag, bits.split_first()) {
        (0x03, Some((0, key))) => Ok(key.to_vec()),
        _ => Err("expected a public key".into()),
    }
}
