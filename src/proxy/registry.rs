//! The device registry: the terminals enrolled with this proxy, their public keys and platform
//! identities, read from a TOML file and reloaded on SIGHUP.
//!
//! Owns: the file format and its validation (every problem listed; duplicate ids and keys are
//! errors). A reload that fails keeps the old registry. It must not talk to the platforms.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use crate::config_file::Problems;
use crate::crypto::RsaVerifier;
use crate::platform::alipay::DeviceQuery;

/// The registry file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    #[serde(default)]
    device: Vec<RawDevice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    device_id: String,
    public_key: String,
    device_sn: String,
    /// The `device_id` sent in `POST /v3/offlineface/authinfo`; defaults to `device_sn`.
    authinfo_device_id: Option<String>,
    sub_mchid: String,
    #[serde(default)]
    sub_appid: String,
    organization_id: String,
    alipay: Option<RawAlipayIdentity>,
    aliyun: Option<RawAliyunIdentity>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlipayIdentity {
    biz_tid: Option<String>,
    supplier_id: Option<String>,
    device_sn: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAliyunIdentity {
    device_id: String,
    biz_type: Option<String>,
}

/// An enrolled terminal.
#[derive(Debug, Clone)]
pub struct Device {
    pub device_id: String,
    pub public_key: RsaVerifier,
    /// WeChat Pay's serial for the device (inspection, fleet list).
    pub device_sn: String,
    /// What `POST /v3/offlineface/authinfo` gets as `device_id`.
    pub authinfo_device_id: String,
    pub sub_mchid: String,
    pub sub_appid: String,
    pub organization_id: String,
    /// How Alipay knows the device, when the merchant uses Alipay for it.
    pub alipay: Option<DeviceQuery>,
    /// Cloudauth's device id and biz type, when the merchant tracks its licence.
    pub aliyun: Option<(String, Option<String>)>,
}

/// Why a registry could not be loaded (shared with the config files).
pub use crate::config_file::ConfigError as RegistryError;

/// What the registry is called in errors.
const WHAT: &str = "registry";

/// A loaded registry.
#[derive(Debug, Default)]
pub struct Registry {
    devices: BTreeMap<String, Arc<Device>>,
}

impl Registry {
    /// Reads and validates the registry file.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        Self::parse(&crate::config_file::read(WHAT, path)?, path)
    }

    /// Validates registry text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, RegistryError> {
        let raw: RawRegistry = crate::config_file::parse_toml(WHAT, text, path)?;
        let mut problems = Problems::new(WHAT);
        let mut devices = BTreeMap::new();
        let mut keys = HashSet::new();
        let mut serials = HashSet::new();
        for (index, d) in raw.device.into_iter().enumerate() {
            let at = format!("device[{index}] ({})", d.device_id);
            if !crate::wire::valid_device_id(&d.device_id) {
                problems.push(
                    &at,
                    format_args!("device_id must be 1 to 64 of A-Z a-z 0-9 . _ -"),
                );
                continue;
            }
            if devices.contains_key(&d.device_id) {
                problems.push(&at, format_args!("device_id is enrolled twice"));
                continue;
            }
            let public_key = match RsaVerifier::from_pem(&d.public_key, &at) {
                Ok(k) => k,
                Err(e) => {
                    problems.push(&at, format_args!("public_key: {e}"));
                    continue;
                }
            };
            if !keys.insert(public_key.fingerprint()) {
                problems.push(
                    &at,
                    format_args!("the same public key is enrolled for another device"),
                );
                continue;
            }
            if !valid_device_sn(&d.device_sn) {
                problems.push(
                    &at,
                    format_args!(
                        "device_sn must be 5 to 200 ASCII letters and digits (WeChat Pay's rule)"
                    ),
                );
                continue;
            }
            // Two entries with one serial would let one terminal read the other's facts.
            if !serials.insert(d.device_sn.clone()) {
                problems.push(
                    &at,
                    format_args!("device_sn {} is enrolled for another device", d.device_sn),
                );
                continue;
            }
            for (field, value) in [
                ("sub_mchid", &d.sub_mchid),
                ("organization_id", &d.organization_id),
            ] {
                if value.trim().is_empty() {
                    problems.push(&at, format_args!("{field} is empty"));
                }
            }
            let alipay = match d.alipay {
                None => None,
                Some(RawAlipayIdentity {
                    biz_tid: Some(biz_tid),
                    supplier_id: None,
                    device_sn: None,
                }) => Some(DeviceQuery::Id { biz_tid }),
                Some(RawAlipayIdentity {
                    biz_tid: None,
                    supplier_id: Some(supplier_id),
                    device_sn: Some(device_sn),
                }) => Some(DeviceQuery::Sn {
                    supplier_id,
                    device_sn,
                }),
                Some(_) => {
                    problems.push(&at, format_args!("[device.alipay] needs biz_tid alone (ID mode) or supplier_id and device_sn (SN mode)"
                    ));
                    continue;
                }
            };
            let aliyun = d.aliyun.map(|a| (a.device_id, a.biz_type));
            devices.insert(
                d.device_id.clone(),
                Arc::new(Device {
                    authinfo_device_id: d.authinfo_device_id.unwrap_or_else(|| d.device_sn.clone()),
                    device_id: d.device_id,
                    public_key,
                    device_sn: d.device_sn,
                    sub_mchid: d.sub_mchid,
                    sub_appid: d.sub_appid,
                    organization_id: d.organization_id,
                    alipay,
                    aliyun,
                }),
            );
        }
        problems.finish(path, Some(Self { devices }))
    }

    /// A registry of `devices` built in code (simulated fleets, benchmarks); a later device of
    /// the same id replaces an earlier one. A registry file is read with [`Registry::parse`],
    /// which also refuses shared keys and serials.
    pub fn from_devices(devices: impl IntoIterator<Item = Device>) -> Self {
        Self {
            devices: devices
                .into_iter()
                .map(|d| (d.device_id.clone(), Arc::new(d)))
                .collect(),
        }
    }

    pub fn get(&self, device_id: &str) -> Option<Arc<Device>> {
        self.devices.get(device_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Every enrolled device, by id.
    pub fn devices(&self) -> impl Iterator<Item = &Arc<Device>> {
        self.devices.values()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

/// WeChat Pay's device_sn rule: 5 to 200 alphanumerics.
pub fn valid_device_sn(sn: &str) -> bool {
    (5..=200).contains(&sn.len()) && sn.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The registry in use, swapped whole on reload so a request sees one version throughout.
#[derive(Debug)]
pub struct SharedRegistry {
    path: std::path::PathBuf,
    current: RwLock<Arc<Registry>>,
}

impl SharedRegistry {
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        Ok(Self {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(Registry::load(path)?)),
        })
    }

    /// The registry now.
    pub fn current(&self) -> Arc<Registry> {
        crate::sync::read(&self.current).clone()
    }

    /// Serves `registry` until the next reload (simulated fleets, benchmarks).
    pub fn replace(&self, registry: Registry) {
        *crate::sync::write(&self.current) = Arc::new(registry);
    }

    /// Reloads the file; on failure the old registry stays and the error is returned.
    pub fn reload(&self) -> Result<usize, RegistryError> {
        let fresh = Registry::load(&self.path)?;
        let n = fresh.len();
        *crate::sync::write(&self.current) = Arc::new(fresh);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public half of test key `n` (distinct `n`, distinct keys).
    fn key_pem(n: usize) -> String {
        crate::crypto::test_key(n).public.to_pem()
    }

    fn entry(id: &str, key: &str, extra: &str) -> String {
        format!(
            "[[device]]\ndevice_id = \"{id}\"\npublic_key = \"\"\"\n{key}\"\"\"\ndevice_sn = \"SN{id}00\"\nsub_mchid = \"1900000002\"\norganization_id = \"ORG1\"\n{extra}\n"
        )
    }

    #[test]
    fn entries_parse_with_their_platform_identities() {
        let text = entry(
            "T1",
            &key_pem(0),
            "[device.alipay]\nbiz_tid = \"TID\"\n[device.aliyun]\ndevice_id = \"wd.X\"\n",
        ) + &entry(
            "T2",
            &key_pem(1),
            "[device.alipay]\nsupplier_id = \"S\"\ndevice_sn = \"D\"\n",
        );
        let r = Registry::parse(&text, Path::new("devices.toml")).expect("valid");
        assert_eq!(r.len(), 2);
        let t1 = r.get("T1").expect("T1");
        assert_eq!(t1.authinfo_device_id, "SNT100");
        assert_eq!(
            t1.alipay,
            Some(DeviceQuery::Id {
                biz_tid: "TID".into()
            })
        );
        assert_eq!(t1.aliyun, Some(("wd.X".into(), None)));
        assert!(matches!(
            r.get("T2").expect("T2").alipay,
            Some(DeviceQuery::Sn { .. })
        ));
        assert!(r.get("T3").is_none());
    }

    #[test]
    fn every_problem_is_listed() {
        let key = key_pem(0);
        let text = entry("T1", &key, "")
            + &entry("T1", &key_pem(1), "")
            + &entry("T2", &key, "")
            + &entry("bad id", &key_pem(2), "")
            + &entry("T4", "not a key", "")
            + &entry(
                "T5",
                &key_pem(3),
                "[device.alipay]\nbiz_tid = \"x\"\nsupplier_id = \"y\"\n",
            )
            + &entry("T1", &key_pem(4), "").replace("device_id = \"T1\"", "device_id = \"T6\"");
        let err = Registry::parse(&text, Path::new("devices.toml")).unwrap_err();
        let RegistryError::Invalid { problems, .. } = err else {
            panic!("expected Invalid");
        };
        assert_eq!(problems.len(), 6, "{problems:#?}");
        assert!(problems[0].contains("enrolled twice"));
        assert!(problems[1].contains("same public key"));
        assert!(problems[2].contains("device_id must be"));
        assert!(problems[3].contains("public_key"));
        assert!(problems[4].contains("biz_tid alone"));
        assert!(
            problems[5].contains("device_sn SNT100 is enrolled for another device"),
            "{}",
            problems[5]
        );
    }

    #[test]
    fn a_bad_reload_keeps_the_old_registry() {
        let (_dir, path) = crate::test_support::temp_path("devices.toml");
        std::fs::write(&path, entry("T1", &key_pem(0), "")).expect("write");
        let shared = SharedRegistry::load(&path).expect("load");
        std::fs::write(&path, "[[device]]\nthis is not toml").expect("write");
        assert!(shared.reload().is_err());
        assert!(shared.current().get("T1").is_some());
        std::fs::write(&path, entry("T2", &key_pem(1), "")).expect("write");
        assert_eq!(shared.reload().expect("reload"), 1);
        assert!(shared.current().get("T1").is_none());
        assert!(shared.current().get("T2").is_some());
    }

    /// The shipped example registry parses once a real key is pasted in.
    #[test]
    fn the_example_registry_matches_the_schema() {
        let example = include_str!("../../examples/devices.toml");
        let key = key_pem(0);
        let text = example.replace(
            "-----BEGIN PUBLIC KEY-----\n(paste the terminal's public key here)\n-----END PUBLIC KEY-----\n",
            &key,
        );
        assert_ne!(text, example);
        let r = Registry::parse(&text, Path::new("examples/devices.toml")).expect("valid example");
        assert!(
            r.get("T-1001")
                .is_some_and(|d| d.alipay.is_some() && d.aliyun.is_some())
        );
    }

    #[test]
    fn device_sn_follows_wechat_rules() {
        assert!(valid_device_sn("AAAAA123456789012345678"));
        assert!(!valid_device_sn("abc"));
        assert!(!valid_device_sn("../../etc"));
        assert!(!valid_device_sn("SN 12345"));
    }
}
