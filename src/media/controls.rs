//! Camera controls (V4L2's brightness, contrast, exposure… and the test pattern's): description and validation.

use serde::Serialize;

/// What kind of value a control takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlKind {
    Integer,
    Boolean,
    Menu,
}

/// One control as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControlInfo {
    /// Lowercase snake_case form of the driver's name ("White Balance, Auto" → "white_balance_auto").
    pub name: String,
    pub kind: ControlKind,
    pub min: i64,
    pub max: i64,
    pub step: i64,
    pub default: i64,
    pub value: i64,
    /// Menu controls: the allowed values and their labels.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub menu: Vec<(i64, String)>,
}

/// The name clients use for a driver's control name.
pub fn normalize_name(driver_name: &str) -> String {
    let mut out = String::new();
    for c in driver_name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_owned()
}

/// Why a control value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("no control named `{0}`; see list-controls")]
    Unknown(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Failed(String),
}

impl ControlInfo {
    /// Checks `value` against the range, step or menu the driver reports.
    pub fn validate(&self, value: i64) -> Result<(), ControlError> {
        let name = &self.name;
        match self.kind {
            ControlKind::Boolean if !(value == 0 || value == 1) => Err(ControlError::OutOfRange(
                format!("{name} is a boolean: 0 or 1"),
            )),
            ControlKind::Menu if !self.menu.iter().any(|(v, _)| *v == value) => {
                Err(ControlError::OutOfRange(format!(
                    "{name} must be one of {}",
                    self.menu
                        .iter()
                        .map(|(v, l)| format!("{v} ({l})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
            ControlKind::Integer
                if value < self.min
                    || value > self.max
                    || (self.step > 1 && (value - self.min) % self.step != 0) =>
            {
                Err(ControlError::OutOfRange(format!(
                    "{name} must be between {} and {} in steps of {}",
                    self.min, self.max, self.step
                )))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(min: i64, max: i64, step: i64) -> ControlInfo {
        ControlInfo {
            name: "brightness".into(),
            kind: ControlKind::Integer,
            min,
            max,
            step,
            default: 0,
            value: 0,
            menu: vec![],
        }
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(normalize_name("Brightness"), "brightness");
        assert_eq!(
            normalize_name("White Balance, Automatic"),
            "white_balance_automatic"
        );
        assert_eq!(normalize_name("  Gain (dB) "), "gain_db");
    }

    #[test]
    fn integer_range_and_step() {
        let c = int(0, 255, 5);
        assert!(c.validate(0).is_ok() && c.validate(255).is_ok() && c.validate(10).is_ok());
        assert!(matches!(c.validate(256), Err(ControlError::OutOfRange(_))));
        assert!(c.validate(-1).is_err());
        assert!(c.validate(7).is_err(), "off the step grid");
        assert!(int(-64, 64, 1).validate(-64).is_ok());
    }

    #[test]
    fn booleans_and_menus() {
        let b = ControlInfo {
            kind: ControlKind::Boolean,
            ..int(0, 1, 1)
        };
        assert!(b.validate(1).is_ok() && b.validate(2).is_err());
        let m = ControlInfo {
            kind: ControlKind::Menu,
            menu: vec![(0, "Auto".into()), (3, "Manual".into())],
            ..int(0, 3, 1)
        };
        assert!(m.validate(3).is_ok());
        let e = m.validate(1).unwrap_err().to_string();
        assert!(e.contains("3 (Manual)"), "{e}");
    }
}
