//! The pmigrate benchmark: a synthetic guest, migrated over loopback or a
//! multi-NIC testbed, side by side with the classic single-stream data
//! plane and the raw TCP ceiling of the same path.
#![warn(missing_docs)]

pub mod ceiling;
pub mod loopback;
pub mod netns;
pub mod postcopy;
pub mod synth;
