//! OpenPGP signing and verification of manifests (sequoia-openpgp, pure-Rust
//! crypto). Keys made by GnuPG or `sq` work: a secret key file as
//! `gpg --export-secret-keys --armor` writes it, a keyring of one or more
//! public certificates, armored or binary.

use std::io::Write;
use std::path::{Path, PathBuf};

use sequoia_openpgp as openpgp;

use openpgp::cert::prelude::*;
use openpgp::crypto::KeyPair;
use openpgp::parse::stream::{
    DetachedVerifierBuilder, MessageLayer, MessageStructure, VerificationHelper,
};
use openpgp::parse::Parse;
use openpgp::policy::StandardPolicy;
use openpgp::serialize::stream::{Message, Signer};
use openpgp::{Cert, KeyHandle, Packet};

/// Signing and verification failures.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot read key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("key file {path} holds no usable signing key with its secret part: {reason}")]
    NoSigningKey { path: PathBuf, reason: String },
    #[error("signing key {fingerprint} in {path} is passphrase-protected; export it without a passphrase for the release machine")]
    Encrypted { path: PathBuf, fingerprint: String },
    #[error("keyring holds no certificates")]
    EmptyKeyring,
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("signature is not valid: {0}")]
    BadSignature(String),
}

/// A secret key that signs manifests.
pub struct SigningKey {
    keypair: KeyPair,
    fingerprint: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads the first valid signing-capable secret key from a key file.
    pub fn from_file(path: &Path) -> Result<SigningKey, SignError> {
        let cert = Cert::from_file(path).map_err(|e| SignError::KeyFile {
            path: path.to_owned(),
            reason: format!("{e:#}"),
        })?;
        Self::from_cert(&cert, path)
    }

    /// Reads a signing key from armored or binary key bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<SigningKey, SignError> {
        let path = Path::new("<memory>");
        let cert = Cert::from_bytes(bytes).map_err(|e| SignError::KeyFile {
            path: path.to_owned(),
            reason: format!("{e:#}"),
        })?;
        Self::from_cert(&cert, path)
    }

    fn from_cert(cert: &Cert, path: &Path) -> Result<SigningKey, SignError> {
        let policy = StandardPolicy::new();
        let no_key = |reason: String| SignError::NoSigningKey {
            path: path.to_owned(),
            reason,
        };
        let valid = cert
            .with_policy(&policy, None)
            .map_err(|e| no_key(format!("{e:#}")))?;
        let ka = valid
            .keys()
            .supported()
            .alive()
            .revoked(false)
            .for_signing()
            .secret()
            .next()
            .ok_or_else(|| {
                no_key("no alive, unrevoked signing-capable key with a secret part".into())
            })?;
        let fingerprint = ka.key().fingerprint().to_hex();
        let key = ka.key().clone();
        if key.secret().is_encrypted() {
            return Err(SignError::Encrypted {
                path: path.to_owned(),
                fingerprint,
            });
        }
        let keypair = key.into_keypair().map_err(|e| no_key(format!("{e:#}")))?;
        Ok(SigningKey {
            keypair,
            fingerprint: cert.fingerprint().to_hex(),
        })
    }

    /// Fingerprint of the certificate the key belongs to.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A binary detached signature over `data`.
    pub fn sign_detached(&self, data: &[u8]) -> Result<Vec<u8>, SignError> {
        let fail = |e: openpgp::anyhow::Error| SignError::Signing(format!("{e:#}"));
        let mut out = Vec::new();
        let message = Message::new(&mut out);
        let mut signer = Signer::new(message, self.keypair.clone())
            .map_err(fail)?
            .detached()
            .build()
            .map_err(fail)?;
        signer
            .write_all(data)
            .map_err(|e| SignError::Signing(e.to_string()))?;
        signer.finalize().map_err(fail)?;
        Ok(out)
    }
}

/// The certificates whose signatures are trusted.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    certs: Vec<Cert>,
}

impl Keyring {
    /// Reads every certificate in a file (armored or binary, one or many).
    pub fn from_file(path: &Path) -> Result<Keyring, SignError> {
        let bytes = std::fs::read(path).map_err(|e| SignError::KeyFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            SignError::KeyFile { reason, .. } => SignError::KeyFile {
                path: path.to_owned(),
                reason,
            },
            other => other,
        })
    }

    /// Reads every certificate in a buffer.
    pub fn from_bytes(bytes: &[u8]) -> Result<Keyring, SignError> {
        let bad = |e: openpgp::anyhow::Error| SignError::KeyFile {
            path: PathBuf::from("<memory>"),
            reason: format!("{e:#}"),
        };
        let certs = CertParser::from_bytes(bytes)
            .map_err(bad)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        if certs.is_empty() {
            return Err(SignError::EmptyKeyring);
        }
        Ok(Keyring {
            certs: certs
                .into_iter()
                .map(|c| c.strip_secret_key_material())
                .collect(),
        })
    }

    /// Reads every `*.asc`, `*.gpg` and `*.pgp` file in the folders (in
    /// name order; a missing folder is skipped), as `keys.d` holds them.
    pub fn from_dirs(dirs: &[PathBuf]) -> Result<Keyring, SignError> {
        let mut ring = Keyring::default();
        for dir in dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(SignError::KeyFile {
                        path: dir.clone(),
                        reason: e.to_string(),
                    })
                }
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x == "asc" || x == "gpg" || x == "pgp")
                })
                .collect();
            files.sort();
            for f in files {
                ring.extend(Keyring::from_file(&f)?);
            }
        }
        if ring.certs.is_empty() {
            return Err(SignError::EmptyKeyring);
        }
        Ok(ring)
    }

    /// Adds the certificates of another keyring.
    pub fn extend(&mut self, other: Keyring) {
        self.certs.extend(other.certs);
    }

    /// Fingerprints of the certificates.
    pub fn fingerprints(&self) -> Vec<String> {
        self.certs
            .iter()
            .map(|c| c.fingerprint().to_hex())
            .collect()
    }

    /// Checks a detached signature over `data`; returns the fingerprint of
    /// the certificate that made it.
    pub fn verify_detached(&self, data: &[u8], signature: &[u8]) -> Result<String, SignError> {
        if self.certs.is_empty() {
            return Err(SignError::EmptyKeyring);
        }
        let policy = StandardPolicy::new();
        let helper = Helper {
            certs: &self.certs,
            signer: None,
        };
        // The outermost message only: sequoia repeats the causes in it.
        let bad = |e: openpgp::anyhow::Error| SignError::BadSignature(e.to_string());
        let mut verifier = DetachedVerifierBuilder::from_bytes(signature)
            .map_err(bad)?
            .with_policy(&policy, None, helper)
            .map_err(bad)?;
        verifier.verify_bytes(data).map_err(bad)?;
        verifier
            .into_helper()
            .signer
            .ok_or_else(|| SignError::BadSignature("no good signature".into()))
    }
}

struct Helper<'a> {
    certs: &'a [Cert],
    signer: Option<String>,
}

impl VerificationHelper for Helper<'_> {
    fn get_certs(&mut self, _ids: &[KeyHandle]) -> openpgp::Result<Vec<Cert>> {
        Ok(self.certs.to_vec())
    }

    fn check(&mut self, structure: MessageStructure) -> openpgp::Result<()> {
        let mut problems = Vec::new();
        for layer in structure.into_iter() {
            if let MessageLayer::SignatureGroup { results } = layer {
                for result in results {
                    match result {
                        Ok(good) => {
                            self.signer = Some(good.ka.cert().fingerprint().to_hex());
                            return Ok(());
                        }
                        Err(e) => problems.push(e.to_string()),
                    }
                }
            }
        }
        if problems.is_empty() {
            problems.push("no signature found".into());
        }
        Err(openpgp::anyhow::anyhow!(
            "not signed by a trusted key: {}",
            problems.join("; ")
        ))
    }
}

/// The issuer fingerprint (or key id) a signature names, without checking
/// it; for display only.
pub fn signature_issuer(signature: &[u8]) -> Option<String> {
    match Packet::from_bytes(signature).ok()? {
        Packet::Signature(sig) => sig
            .issuer_fingerprints()
            .next()
            .map(|f| f.to_hex())
            .or_else(|| sig.issuers().next().map(|k| k.to_hex())),
        _ => None,
    }
}

/// Makes a new Ed25519 key (for tests, demos and `tandem-release keygen`);
/// returns the armored secret key and the armored public certificate.
pub fn generate_key(user_id: &str) -> Result<(String, String), SignError> {
    use openpgp::serialize::SerializeInto;
    let fail = |e: openpgp::anyhow::Error| SignError::Signing(format!("{e:#}"));
    let (cert, _revocation) = CertBuilder::new()
        .add_userid(user_id)
        .set_cipher_suite(CipherSuite::Cv25519)
        .add_signing_subkey()
        .generate()
        .map_err(fail)?;
    let secret = cert.as_tsk().armored().to_vec().map_err(fail)?;
    let public = cert.armored().to_vec().map_err(fail)?;
    Ok((
        String::from_utf8_lossy(&secret).into_owned(),
        String::from_utf8_lossy(&public).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_d_folders_are_read_and_an_empty_set_is_an_error() {
        let root = std::env::temp_dir().join(format!("tandem-keysd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (a, b) = (root.join("usr"), root.join("etc"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let dirs = vec![a.clone(), b.clone(), root.join("missing")];
        assert!(matches!(
            Keyring::from_dirs(&dirs),
            Err(SignError::EmptyKeyring)
        ));
        let (secret, public) = generate_key("k1 <k1@example.invalid>").unwrap();
        let (_, other) = generate_key("k2 <k2@example.invalid>").unwrap();
        std::fs::write(a.join("release.asc"), &public).unwrap();
        std::fs::write(b.join("extra.asc"), &other).unwrap();
        std::fs::write(b.join("notes.txt"), "not a key").unwrap();
        let ring = Keyring::from_dirs(&dirs).unwrap();
        assert_eq!(ring.fingerprints().len(), 2);
        let key = SigningKey::from_bytes(secret.as_bytes()).unwrap();
        let sig = key.sign_detached(b"manifest").unwrap();
        assert_eq!(
            ring.verify_detached(b"manifest", &sig).unwrap(),
            key.fingerprint()
        );
        std::fs::write(b.join("broken.asc"), "garbage").unwrap();
        assert!(Keyring::from_dirs(&dirs).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
