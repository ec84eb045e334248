//! Whole numbers as JSON may write them: `60` or `60.0` (both are integers to JSON Schema,
//! and so to the clients it generates), never `60.5` or `-1`. For `deserialize_with`.

use core::fmt;
use core::marker::PhantomData;

use serde::de::{Deserializer, Error, Unexpected, Visitor};

struct Whole<T>(PhantomData<T>);

impl<T: TryFrom<u64>> Visitor<'_> for Whole<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a whole number in range")
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<T, E> {
        let n = u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))?;
        self.visit_u64(n)
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<T, E> {
        if v.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&v) {
            self.visit_u64(v as u64)
        } else {
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }
}

/// A whole number (`deserialize_with = "crate::whole::number"`).
pub fn number<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(Whole(PhantomData))
}

/// An optional whole number: absent (with `#[serde(default)]`) or null is `None`.
pub fn optional<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Option<T>, D::Error> {
    struct Maybe<T>(PhantomData<T>);
    impl<'de, T: TryFrom<u64>> Visitor<'de> for Maybe<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a whole number in range, or null")
        }

        fn visit_none<E: Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_unit<E: Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
            number(d).map(Some)
        }
    }
    d.deserialize_option(Maybe(PhantomData))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct T {
        #[serde(deserialize_with = "super::number")]
        n: u8,
        #[serde(default, deserialize_with = "super::optional")]
        o: Option<u64>,
    }

    #[test]
    fn whole_numbers_in_any_spelling() {
        let t = |s: &str| serde_json::from_str::<T>(s);
        assert_eq!(t(r#"{"n": 5}"#).unwrap(), T { n: 5, o: None });
        assert_eq!(
            t(r#"{"n": 5.0, "o": 7.0}"#).unwrap(),
            T { n: 5, o: Some(7) }
        );
        assert_eq!(t(r#"{"n": 5, "o": null}"#).unwrap(), T { n: 5, o: None });
        for bad in [
            r#"{"n": 5.5}"#,
            r#"{"n": -1}"#,
            r#"{"n": 256}"#,
            r#"{"n": "5"}"#,
            r#"{"n": 1, "o": -2.0}"#,
        ] {
            assert!(t(bad).is_err(), "{bad}");
        }
    }
}
