//! A key's `meta`: a JSON object the edge forwards to the origin (who is calling: a
//! tenant, a plan). Stored compact, at most [`MAX_META_BYTES`].

use serde_json::Value;

use super::Error;

/// Largest `meta`, as compact JSON (the KV record carries it, and the origin gets it in
/// one header: base64url makes it 4/3 larger).
pub const MAX_META_BYTES: usize = 1024;

/// A request's `meta` as stored: compact JSON of an object of at most 1 KB. `null` means
/// none.
pub fn validate_meta(meta: Value) -> Result<Option<String>, Error> {
    match meta {
        Value::Null => Ok(None),
        Value::Object(_) => {
            let compact = meta.to_string();
            if compact.len() > MAX_META_BYTES {
                return Err(Error::invalid(format!(
                    "meta must be at most {MAX_META_BYTES} bytes as compact JSON (it is {})",
                    compact.len()
                )));
            }
            Ok(Some(compact))
        }
        _ => Err(Error::invalid(
            "meta must be a JSON object (or null for none)",
        )),
    }
}

/// Stored `meta` as JSON, for responses.
pub fn meta_value(stored: Option<&str>) -> Option<Value> {
    stored.and_then(|m| serde_json::from_str(m).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_up_to_the_limit() {
        assert_eq!(validate_meta(Value::Null).unwrap(), None);
        let meta = json!({"tenant": "ačme \"q\"", "plan": 3});
        let stored = validate_meta(meta.clone()).unwrap().unwrap();
        assert!(!stored.contains(' ') || stored.contains("ačme"), "{stored}");
        assert_eq!(meta_value(Some(&stored)), Some(meta));
        for bad in [json!([1]), json!("s"), json!(1), json!(true)] {
            assert!(validate_meta(bad).is_err());
        }
        // 1024 bytes exactly: {"a":"…"} is 8 bytes around the string.
        assert!(validate_meta(json!({"a": "x".repeat(MAX_META_BYTES - 8)})).is_ok());
        assert!(validate_meta(json!({"a": "x".repeat(MAX_META_BYTES - 7)})).is_err());
    }
}
