//! Configuration loading shared by every role: one serde struct per role, read from a commented
//! TOML file and overridden by `MAGNETAR_<ROLE>_*` environment variables (nested fields joined by
//! `__`). Durations are human-readable (`"250ms"`, `"5s"`) and sizes too (`"64MiB"`).

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A configuration that cannot be used, with the reason in words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A role's configuration: how it is checked after loading.
pub trait RoleConfig: Serialize + DeserializeOwned + Default {
    /// Environment variable prefix, e.g. `MAGNETAR_BOOKIE_`.
    const ENV_PREFIX: &'static str;
    /// Checks values that parse but make no sense; the message names the field.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads a role config: defaults, then the TOML file (if any), then environment variables.
pub fn load<T: RoleConfig>(file: Option<&Path>) -> Result<T, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError(format!("config file {} does not exist", path.display())));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Env::prefixed(T::ENV_PREFIX).split("__"));
    let config: T = figment.extract().map_err(|e| {
        let mut msg = String::new();
        for err in e {
            if !msg.is_empty() {
                msg.push_str("; ");
            }
            msg.push_str(&err.to_string());
        }
        ConfigError(format!("invalid configuration: {msg}"))
    })?;
    config.validate()?;
    Ok(config)
}

/// Parses a config from a TOML string (no environment), for tests and `--check-config` output.
pub fn from_toml<T: RoleConfig>(text: &str) -> Result<T, ConfigError> {
    let config: T = Figment::from(Serialized::defaults(T::default()))
        .merge(Toml::string(text))
        .extract()
        .map_err(|e| ConfigError(format!("invalid configuration: {e}")))?;
    config.validate()?;
    Ok(config)
}

/// Where a `magnetar standalone` on this machine publishes its TLS certificate for the QUIC port
/// `port`, so local clients of the same user trust it without being told:
/// `$XDG_RUNTIME_DIR/magnetar-standalone-PORT.pem`, else `$TMPDIR/magnetar-UID/...`.
pub fn local_standalone_cert_path(port: u16) -> std::path::PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("magnetar-{}", rustix::process::getuid().as_raw())));
    base.join(format!("magnetar-standalone-{port}.pem"))
}
