//! `[schemas]`: event contracts (`crate::contract`).

use serde::Deserialize;

use super::{invalid, ConfigError};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchemas {
    dir: Option<String>,
    require_schema: Option<bool>,
}

/// `[schemas]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchemasConfig {
    /// `<aggregatetype>/<type>.json` JSON Schemas; `None`: no event is checked.
    pub dir: Option<String>,
    /// Dead-letter (`schema_missing`) an event whose type has no schema.
    pub require_schema: bool,
}

pub(super) fn schemas(raw: RawSchemas) -> Result<SchemasConfig, ConfigError> {
    let dir = raw.dir.filter(|d| !d.is_empty());
    if let Some(d) = &dir {
        if !std::path::Path::new(d).is_dir() {
            return Err(invalid(
                "schemas.dir",
                format!("`{d}` is not a readable directory"),
            ));
        }
    }
    let require_schema = raw.require_schema.unwrap_or(false);
    if require_schema && dir.is_none() {
        return Err(invalid(
            "schemas.require_schema",
            "needs schemas.dir (without schemas every event would be dead-lettered)",
        ));
    }
    Ok(SchemasConfig {
        dir,
        require_schema,
    })
}
