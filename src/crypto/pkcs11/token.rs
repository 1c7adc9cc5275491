//! The token side of PKCS#11 keys (feature `pkcs11`): module, token, login, key, signing.
//!
//! Threading: a cryptoki [`Session`] may move between threads but not be shared (it is `Send`,
//! not `Sync`), and a PKCS#11 session runs one operation at a time. A [`TokenSigner`] therefore
//! keeps a small pool of idle sessions behind a mutex: a signature takes one out (or opens one),
//! signs without holding the lock, and puts it back, so concurrent requests on the proxy sign in
//! parallel sessions. The login is the application's, not the session's (PKCS#11 §5.6): one
//! `C_Login` serves every session the process opens on that token.
//!
//! A token that goes away (a USB HSM unplugged) fails the signature with a device or session
//! error, or vanishes from the slot list: every pooled session is dropped, and each later
//! signature looks for the token again, logs in and finds the key anew, so signing resumes by
//! itself when the token is back. Those failures are [`TokenError::is_transient`]; a wrong PIN
//! is not (retrying it would lock the token).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::uri::{PinSource, Pkcs11Uri, encode_bytes};
use crate::crypto::RsaVerifier;

/// Idle sessions kept for reuse; more concurrent signatures open more, which are closed after.
const MAX_IDLE_SESSIONS: usize = 4;

/// What the start-up check signs to prove that key, PIN, mechanism and public half fit.
const SELF_TEST_MESSAGE: &[u8] = b"authinfod pkcs11 self-test";

/// A cryptoki failure, shown short (`C_Login: PinIncorrect`) rather than with the standard's
/// paragraph per return value.
#[derive(Debug)]
pub struct Pkcs11Failure(CkError);

impl std::fmt::Display for Pkcs11Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            CkError::Pkcs11(rv, function) => write!(f, "{function} returned {rv:?}"),
            other => write!(f, "{other}"),
        }
    }
}

impl std::error::Error for Pkcs11Failure {}

/// Why a token key cannot be used, each phrased for the operator who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the PIN file cannot be used")]
    PinFile(#[source] crate::config_file::PrivateFileError),
    #[error("cannot read the PIN file {path}")]
    PinRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "PKCS#11 module {path} does not exist: install the token's module (SoftHSM2: softhsm2, a TPM: libtpm2-pkcs11-1, smart cards: opensc-pkcs11) or correct module-path"
    )]
    ModuleMissing { path: PathBuf },
    #[error("cannot load the PKCS#11 module {path} (a PKCS#11 module for this architecture?)")]
    Module {
        path: PathBuf,
        #[source]
        source: Pkcs11Failure,
    },
    #[error(
        "no {wanted} in PKCS#11 module {}; tokens present: {}",
        module.display(),
        listing(present)
    )]
    TokenNotFound {
        wanted: String,
        module: PathBuf,
        present: Vec<String>,
    },
    #[error(
        "{wanted} matches {} tokens ({}): add token= or serial= to the URI",
        present.len(),
        present.join(", ")
    )]
    TokenAmbiguous {
        wanted: String,
        present: Vec<String>,
    },
    #[error("token {token:?} needs a PIN: add pin-source=file:/path/to/pin (mode 0600) to the URI")]
    NoPin { token: String },
    #[error(
        "the PIN for token {token:?} is wrong{}: correct the PIN (the pin-source file, or pin-value); every wrong PIN brings the token closer to locking itself",
        if *final_try { " (the token says one more wrong PIN locks it)" } else { "" }
    )]
    WrongPin { token: String, final_try: bool },
    #[error(
        "the user PIN of token {token:?} is locked after too many wrong PINs: unlock it with the SO PIN (softhsm2-util or pkcs11-tool --init-pin --login --login-type so)"
    )]
    PinLocked { token: String },
    #[error(
        "token {token:?} has no {wanted}; private keys in it: {}",
        listing(present)
    )]
    ObjectNotFound {
        token: String,
        wanted: String,
        present: Vec<String>,
    },
    #[error(
        "{wanted} matches {count} private keys in token {token:?}: add object= or id= to the URI"
    )]
    ObjectAmbiguous {
        token: String,
        wanted: String,
        count: usize,
    },
    #[error("{wanted} in token {token:?} is not an RSA key")]
    NotRsa { token: String, wanted: String },
    #[error("{wanted} in token {token:?} may not sign (CKA_SIGN is false)")]
    CannotSign { token: String, wanted: String },
    #[error("token {token:?} does not offer {mechanism}")]
    MechanismUnsupported {
        token: String,
        mechanism: &'static str,
    },
    #[error("the public half of {wanted} in token {token:?} is not usable: {reason}")]
    PublicKey {
        token: String,
        wanted: String,
        reason: String,
    },
    #[error(
        "{wanted} in token {token:?} signed, but the signature does not verify with its public key"
    )]
    SelfTest { token: String, wanted: String },
    #[error(
        "{wanted} already exists in token {token:?}; pass --force to replace it (its enrolment at the proxy stops working)"
    )]
    Exists { token: String, wanted: String },
    #[error("name the key to generate: add object=LABEL (and/or id=...) to the URI")]
    Unnamed,
    #[error(
        "token {token:?} made the new key extractable or not sensitive, against the template; it was deleted again"
    )]
    Weak { token: String },
    #[error("token {token:?}: {during} failed")]
    Pkcs11 {
        token: String,
        during: &'static str,
        #[source]
        source: Pkcs11Failure,
    },
}

fn listing(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

impl TokenError {
    /// True when the token may simply be away (unplugged, resetting): trying again later can
    /// succeed without anyone changing anything. A wrong PIN, a missing key on a present token
    /// and the like are not: they need an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::TokenNotFound { .. } => true,
            Self::Pkcs11 { source, .. } => transient(&source.0),
            _ => false,
        }
    }
}

/// The return values that mean "the token or its session went away", after which a new session
/// (or a later one) may work.
fn transient(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::SessionCount
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::SlotIdInvalid
                | RvError::CryptokiNotInitialized
                | RvError::FunctionFailed
                | RvError::GeneralError,
            _
        )
    )
}

// === the module, the token, the login ===

/// Loads the module and initialises it. PKCS#11 initialises a module once per process: a second
/// key in the same module (the merchant key and the Alipay app key in one HSM) finds it
/// initialised already, which is fine. cryptoki never calls `C_Finalize` on drop, so one signer
/// going away does not end the sessions of another.
fn load_module(path: &Path) -> Result<Pkcs11, TokenError> {
    if !path.exists() {
        return Err(TokenError::ModuleMissing {
            path: path.to_owned(),
        });
    }
    let failed = |source| TokenError::Module {
        path: path.to_owned(),
        source: Pkcs11Failure(source),
    };
    let pkcs11 = Pkcs11::new(path).map_err(failed)?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(pkcs11),
        Err(e) => Err(failed(e)),
    }
}

/// The PIN the URI points at: a private file's first line, or the URI's own `pin-value`.
fn read_pin(uri: &Pkcs11Uri) -> Result<Option<AuthPin>, TokenError> {
    match &uri.pin {
        None => Ok(None),
        Some(PinSource::Value(pin)) => Ok(Some(AuthPin::from(pin.as_str()))),
        Some(PinSource::File(path)) => {
            crate::config_file::check_private_file(path).map_err(TokenError::PinFile)?;
            let text = std::fs::read_to_string(path).map_err(|source| TokenError::PinRead {
                path: path.clone(),
                source,
            })?;
            let pin = text.strip_suffix('\n').unwrap_or(&text);
            let pin = pin.strip_suffix('\r').unwrap_or(pin);
            Ok(Some(AuthPin::from(pin)))
        }
    }
}

/// The one token the URI names.
#[derive(Debug, Clone)]
struct FoundToken {
    slot: Slot,
    label: String,
    login_required: bool,
    protected_path: bool,
}

fn matches(wanted: &Option<String>, actual: &str) -> bool {
    wanted.as_deref().is_none_or(|w| w == actual)
}

fn find_token(pkcs11: &Pkcs11, uri: &Pkcs11Uri) -> Result<FoundToken, TokenError> {
    let wanted = uri.token_description();
    let failed = |during, source| TokenError::Pkcs11 {
        token: wanted.clone(),
        during,
        source: Pkcs11Failure(source),
    };
    let library_fits = if uri.library_manufacturer.is_some() || uri.library_description.is_some() {
        let info = pkcs11
            .get_library_info()
            .map_err(|e| failed("reading the module's information", e))?;
        matches(&uri.library_manufacturer, info.manufacturer_id())
            && matches(&uri.library_description, info.library_description())
    } else {
        true
    };
    let slots = pkcs11
        .get_slots_with_token()
        .map_err(|e| failed("listing the slots", e))?;
    let mut present = Vec::new();
    let mut found = Vec::new();
    for slot in slots {
        // A slot whose token went away between the two calls is simply not there.
        let Ok(info) = pkcs11.get_token_info(slot) else {
            continue;
        };
        if !info.token_initialized() {
            continue;
        }
        let name = format!("{:?} (serial {})", info.label(), info.serial_number());
        let slot_fits = if uri.slot_description.is_some() || uri.slot_manufacturer.is_some() {
            pkcs11.get_slot_info(slot).is_ok_and(|s| {
                matches(&uri.slot_description, s.slot_description())
                    && matches(&uri.slot_manufacturer, s.manufacturer_id())
            })
        } else {
            true
        };
        if library_fits
            && slot_fits
            && matches(&uri.token, info.label())
            && matches(&uri.manufacturer, info.manufacturer_id())
            && matches(&uri.serial, info.serial_number())
            && matches(&uri.model, info.model())
            && uri.slot_id.is_none_or(|id| id == slot.id())
        {
            found.push((
                name.clone(),
                FoundToken {
                    slot,
                    label: info.label().to_owned(),
                    login_required: info.login_required(),
                    protected_path: info.protected_authentication_path(),
                },
            ));
        }
        present.push(name);
    }
    match found.len() {
        1 => Ok(found.remove(0).1),
        0 => Err(TokenError::TokenNotFound {
            wanted,
            module: uri.module_path.clone(),
            present,
        }),
        _ => Err(TokenError::TokenAmbiguous {
            wanted,
            present: found.into_iter().map(|(name, _)| name).collect(),
        }),
    }
}

/// The mechanism every key is used with, and its name for errors.
const SIGNING: (MechanismType, &str) = (
    MechanismType::SHA256_RSA_PKCS,
    "CKM_SHA256_RSA_PKCS (SHA256withRSA) signing",
);

/// Reads the PIN, loads the module and finds the one token `uri` names, which must have each
/// of `mechanisms` (checked in order; the first it lacks is the error).
fn open_token(
    uri: &Pkcs11Uri,
    mechanisms: &[(MechanismType, &'static str)],
) -> Result<(Option<AuthPin>, Pkcs11, FoundToken), TokenError> {
    let pin = read_pin(uri)?;
    let pkcs11 = load_module(&uri.module_path)?;
    let token = find_token(&pkcs11, uri)?;
    for &(mechanism, name) in mechanisms {
        require_mechanism(&pkcs11, &token, mechanism, name)?;
    }
    Ok((pin, pkcs11, token))
}

fn require_mechanism(
    pkcs11: &Pkcs11,
    token: &FoundToken,
    mechanism: MechanismType,
    name: &'static str,
) -> Result<(), TokenError> {
    let list = pkcs11
        .get_mechanism_list(token.slot)
        .map_err(|source| TokenError::Pkcs11 {
            token: token.label.clone(),
            during: "listing the mechanisms",
            source: Pkcs11Failure(source),
        })?;
    if list.contains(&mechanism) {
        Ok(())
    } else {
        Err(TokenError::MechanismUnsupported {
            token: token.label.clone(),
            mechanism: name,
        })
    }
}

/// Opens a session on the token and logs the user in (once per process: a login that is
/// already there is fine).
fn open_session(
    pkcs11: &Pkcs11,
    token: &FoundToken,
    pin: Option<&AuthPin>,
    read_write: bool,
) -> Result<Session, TokenError> {
    let failed = |during, source| TokenError::Pkcs11 {
        token: token.label.clone(),
        during,
        source: Pkcs11Failure(source),
    };
    let session = if read_write {
        pkcs11.open_rw_session(token.slot)
    } else {
        pkcs11.open_ro_session(token.slot)
    }
    .map_err(|e| failed("opening a session", e))?;
    if !token.login_required {
        return Ok(session);
    }
    if pin.is_none() && !token.protected_path {
        return Err(TokenError::NoPin {
            token: token.label.clone(),
        });
    }
    match session.login(UserType::User, pin) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(TokenError::WrongPin {
            token: token.label.clone(),
            final_try: pkcs11
                .get_token_info(token.slot)
                .is_ok_and(|i| i.user_pin_final_try()),
        }),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(TokenError::PinLocked {
            token: token.label.clone(),
        }),
        Err(e) => Err(failed("logging in", e)),
    }
}

/// The template attributes that name the URI's object (label and id).
fn naming(uri: &Pkcs11Uri) -> Vec<Attribute> {
    let mut template = Vec::new();
    if let Some(label) = &uri.object {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    template
}

/// A private key's name for listings: its label and id.
fn key_name(session: &Session, key: ObjectHandle) -> String {
    let attributes = session
        .get_attributes(key, &[AttributeType::Label, AttributeType::Id])
        .unwrap_or_default();
    let mut name = String::new();
    for a in attributes {
        match a {
            Attribute::Label(l) => {
                name.push_str(&format!("object={:?}", String::from_utf8_lossy(&l)))
            }
            Attribute::Id(id) if !id.is_empty() => {
                if !name.is_empty() {
                    name.push(' ');
                }
                name.push_str(&format!("id={}", encode_bytes(&id)));
            }
            _ => {}
        }
    }
    if name.is_empty() {
        "(unnamed)".into()
    } else {
        name
    }
}

/// The one private key the URI names.
fn find_key(
    session: &Session,
    uri: &Pkcs11Uri,
    token: &FoundToken,
) -> Result<ObjectHandle, TokenError> {
    let wanted = uri.object_description();
    let failed = |source| TokenError::Pkcs11 {
        token: token.label.clone(),
        during: "searching for the key",
        source: Pkcs11Failure(source),
    };
    let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
    template.extend(naming(uri));
    let mut keys = session.find_objects(&template).map_err(failed)?;
    match keys.len() {
        1 => Ok(keys.remove(0)),
        0 => {
            let all = session
                .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                .map_err(failed)?;
            Err(TokenError::ObjectNotFound {
                token: token.label.clone(),
                wanted,
                present: all.into_iter().map(|k| key_name(session, k)).collect(),
            })
        }
        count => Err(TokenError::ObjectAmbiguous {
            token: token.label.clone(),
            wanted,
            count,
        }),
    }
}

/// What the start-up check reads about the key: everything but the private half.
struct KeyFacts {
    public: RsaVerifier,
    /// CKA_EXTRACTABLE true or CKA_SENSITIVE false: the private key can leave the token.
    exposed: bool,
}

fn key_facts(
    session: &Session,
    key: ObjectHandle,
    token: &FoundToken,
    wanted: &str,
) -> Result<KeyFacts, TokenError> {
    let attributes = session
        .get_attributes(
            key,
            &[
                AttributeType::KeyType,
                AttributeType::Sign,
                AttributeType::Extractable,
                AttributeType::Sensitive,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
                AttributeType::Id,
                AttributeType::Label,
            ],
        )
        .map_err(|source| TokenError::Pkcs11 {
            token: token.label.clone(),
            during: "reading the key's attributes",
            source: Pkcs11Failure(source),
        })?;
    let (mut modulus, mut exponent, mut exposed) = (None, None, false);
    let mut own_name = Vec::new();
    for a in attributes {
        match a {
            Attribute::KeyType(t) if t != KeyType::RSA => {
                return Err(TokenError::NotRsa {
                    token: token.label.clone(),
                    wanted: wanted.to_owned(),
                });
            }
            Attribute::Sign(false) => {
                return Err(TokenError::CannotSign {
                    token: token.label.clone(),
                    wanted: wanted.to_owned(),
                });
            }
            Attribute::Extractable(true) | Attribute::Sensitive(false) => exposed = true,
            Attribute::Modulus(n) => modulus = Some(n),
            Attribute::PublicExponent(e) => exponent = Some(e),
            Attribute::Id(id) if !id.is_empty() => own_name.push(Attribute::Id(id)),
            Attribute::Label(l) if !l.is_empty() => own_name.push(Attribute::Label(l)),
            _ => {}
        }
    }
    // A private key object need not show its modulus and exponent; its public key object, with
    // the same id (or label), does.
    if (modulus.is_none() || exponent.is_none()) && !own_name.is_empty() {
        let mut template = vec![Attribute::Class(ObjectClass::PUBLIC_KEY)];
        template.extend(own_name);
        if let Some(public) = session
            .find_objects(&template)
            .ok()
            .and_then(|v| v.first().copied())
        {
            for a in session
                .get_attributes(
                    public,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .unwrap_or_default()
            {
                match a {
                    Attribute::Modulus(n) => modulus = Some(n),
                    Attribute::PublicExponent(e) => exponent = Some(e),
                    _ => {}
                }
            }
        }
    }
    let bad = |reason: String| TokenError::PublicKey {
        token: token.label.clone(),
        wanted: wanted.to_owned(),
        reason,
    };
    let (Some(n), Some(e)) = (modulus, exponent) else {
        return Err(bad(
            "neither it nor a public key object with its id shows the modulus and exponent".into(),
        ));
    };
    let public = RsaVerifier::from_modulus_exponent(&n, &e, wanted)
        .map_err(|err| bad(crate::error_chain(&err)))?;
    Ok(KeyFacts { public, exposed })
}

// === impl TokenSigner ===

/// One session with the key's handle in it (handles are per application, but a token that came
/// back gives new ones: they are looked up again with each new session).
struct Live {
    session: Session,
    key: ObjectHandle,
}

/// An RSA private key inside a PKCS#11 token, signing SHA256withRSA (CKM_SHA256_RSA_PKCS) there.
pub struct TokenSigner {
    uri: Pkcs11Uri,
    pkcs11: Pkcs11,
    /// Kept to log in again after the token comes back. A secret: never shown.
    pin: Option<AuthPin>,
    token: String,
    public: RsaVerifier,
    exposed: bool,
    idle: Mutex<Vec<Live>>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("uri", &self.uri)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// Loads the module, finds the one token and the one private key the URI names, logs in,
    /// checks that the token signs SHA256withRSA, and signs a test message that must verify
    /// with the key's public half: everything signing at run time needs, checked now.
    pub fn open(uri: &Pkcs11Uri) -> Result<Self, TokenError> {
        let (pin, pkcs11, token) = open_token(uri, &[SIGNING])?;
        let session = open_session(&pkcs11, &token, pin.as_ref(), false)?;
        let key = find_key(&session, uri, &token)?;
        let wanted = uri.object_description();
        let facts = key_facts(&session, key, &token, &wanted)?;
        let signature = session
            .sign(&Mechanism::Sha256RsaPkcs, key, SELF_TEST_MESSAGE)
            .map_err(|source| TokenError::Pkcs11 {
                token: token.label.clone(),
                during: "signing",
                source: Pkcs11Failure(source),
            })?;
        if !facts.public.verify(SELF_TEST_MESSAGE, &signature) {
            return Err(TokenError::SelfTest {
                token: token.label,
                wanted,
            });
        }
        Ok(Self {
            uri: uri.clone(),
            pkcs11,
            pin,
            token: token.label,
            public: facts.public,
            exposed: facts.exposed,
            idle: Mutex::new(vec![Live { session, key }]),
        })
    }

    /// The URI it was opened with.
    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    /// The key's public half.
    pub fn public_key(&self) -> &RsaVerifier {
        &self.public
    }

    /// What an operator should know but that does not stop the key from working.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.exposed {
            warnings.push(format!(
                "{} in token {:?} is extractable or not sensitive: the private key can be read out of the token; make one that cannot with authinfod keygen --pkcs11",
                self.uri.object_description(),
                self.token
            ));
        }
        if matches!(self.uri.pin, Some(PinSource::Value(_))) {
            warnings.push(
                "the URI carries its PIN (pin-value), which is meant for tests; use pin-source=file:/path (mode 0600)".into(),
            );
        }
        warnings
    }

    /// SHA256withRSA over `message`, inside the token. A session that fails because the token
    /// went away is dropped with every idle one, and the signature is tried once more on a new
    /// session (the token looked up again, the user logged in again).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, TokenError> {
        let pooled = crate::sync::lock(&self.idle).pop();
        let live = match pooled {
            Some(live) => live,
            None => self.connect()?,
        };
        match live
            .session
            .sign(&Mechanism::Sha256RsaPkcs, live.key, message)
        {
            Ok(signature) => {
                self.put_back(live);
                Ok(signature)
            }
            Err(e) if transient(&e) => {
                drop(live);
                crate::sync::lock(&self.idle).clear();
                let live = self.connect()?;
                let signature = live
                    .session
                    .sign(&Mechanism::Sha256RsaPkcs, live.key, message)
                    .map_err(|source| self.failed("signing", source))?;
                self.put_back(live);
                Ok(signature)
            }
            Err(e) => Err(self.failed("signing", e)),
        }
    }

    fn failed(&self, during: &'static str, source: CkError) -> TokenError {
        TokenError::Pkcs11 {
            token: self.token.clone(),
            during,
            source: Pkcs11Failure(source),
        }
    }

    /// A new session with the key found in it. A token that is not in the slot list may have
    /// come back: most modules (SoftHSM among them) build their slot list once, in
    /// `C_Initialize`, so the module is finalised and initialised again and the token looked
    /// for once more.
    fn connect(&self) -> Result<Live, TokenError> {
        let token = match find_token(&self.pkcs11, &self.uri) {
            Ok(token) => token,
            Err(e) if e.is_transient() => {
                self.reinitialize();
                find_token(&self.pkcs11, &self.uri)?
            }
            Err(e) => return Err(e),
        };
        let session = open_session(&self.pkcs11, &token, self.pin.as_ref(), false)?;
        let key = find_key(&session, &self.uri, &token)?;
        Ok(Live { session, key })
    }

    /// `C_Finalize` then `C_Initialize`: the module forgets every session and login of this
    /// process (another key in the same module finds its sessions gone, which is transient for
    /// it too, and reconnects) and looks at its slots afresh. Failures show in the next lookup.
    fn reinitialize(&self) {
        crate::sync::lock(&self.idle).clear();
        let finalized = self.pkcs11.clone().finalize();
        let initialized = self
            .pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
        tracing::debug!(
            module = %self.uri.module_path.display(),
            finalized = ?finalized.err().map(Pkcs11Failure),
            initialized = ?initialized.err().map(Pkcs11Failure),
            "pkcs11 module initialised again to look for the token"
        );
    }

    fn put_back(&self, live: Live) {
        let mut idle = crate::sync::lock(&self.idle);
        if idle.len() < MAX_IDLE_SESSIONS {
            idle.push(live);
        }
    }
}

/// Generates an RSA key pair of `bits` inside the token the URI names, labelled and identified
/// as the URI says (a random 8-byte id when it gives none): the private half sensitive and not
/// extractable, so it never leaves the token. An existing object of that label or id is an
/// error unless `force`, which deletes it first. Returns the new key opened as the daemon will
/// open it (same URI, PIN, mechanism, a test signature).
pub fn generate_key(uri: &Pkcs11Uri, bits: u64, force: bool) -> Result<TokenSigner, TokenError> {
    if uri.object.is_none() && uri.id.is_none() {
        return Err(TokenError::Unnamed);
    }
    let key_generation = (
        MechanismType::RSA_PKCS_KEY_PAIR_GEN,
        "CKM_RSA_PKCS_KEY_PAIR_GEN (RSA key generation)",
    );
    let (pin, pkcs11, token) = open_token(uri, &[key_generation, SIGNING])?;
    let session = open_session(&pkcs11, &token, pin.as_ref(), true)?;
    let failed = |during, source| TokenError::Pkcs11 {
        token: token.label.clone(),
        during,
        source: Pkcs11Failure(source),
    };
    let existing = session
        .find_objects(&naming(uri))
        .map_err(|e| failed("searching for existing keys", e))?;
    if !existing.is_empty() {
        if !force {
            return Err(TokenError::Exists {
                token: token.label.clone(),
                wanted: uri.object_description(),
            });
        }
        for object in existing {
            session
                .destroy_object(object)
                .map_err(|e| failed("deleting the old key", e))?;
        }
    }
    let id = match &uri.id {
        Some(id) => id.clone(),
        None => crate::crypto::random_bytes(8).map_err(|_| TokenError::Pkcs11 {
            token: token.label.clone(),
            during: "choosing an id",
            source: Pkcs11Failure(CkError::InvalidValue),
        })?,
    };
    let mut name = vec![Attribute::Id(id)];
    if let Some(label) = &uri.object {
        name.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    // CK_ULONG is 32 bits on 32-bit ARM (armv7 terminals).
    let modulus_bits = std::os::raw::c_ulong::try_from(bits).map_err(|_| TokenError::Pkcs11 {
        token: token.label.clone(),
        during: "choosing the key size",
        source: Pkcs11Failure(CkError::InvalidValue),
    })?;
    let mut public_template = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::ModulusBits(modulus_bits.into()),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
    ];
    public_template.extend(name.iter().cloned());
    let mut private_template = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
    ];
    private_template.extend(name);
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &public_template,
            &private_template,
        )
        .map_err(|e| failed("generating the key pair", e))?;
    let kept = session
        .get_attributes(
            private,
            &[AttributeType::Extractable, AttributeType::Sensitive],
        )
        .map_err(|e| failed("reading the new key's attributes", e))?;
    if kept.iter().any(|a| {
        matches!(
            a,
            Attribute::Extractable(true) | Attribute::Sensitive(false)
        )
    }) {
        let _ = session.destroy_object(private);
        let _ = session.destroy_object(public);
        return Err(TokenError::Weak { token: token.label });
    }
    drop(session);
    TokenSigner::open(uri)
}
