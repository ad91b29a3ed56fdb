//! `habar-chaos`: a Jepsen-style test of a local Habar cluster under process faults.
//!
//! A seeded [`nemesis`] kills, restarts and pauses `habar serve` processes
//! ([`cluster`]) while a [`workload`] publishes, reads and subscribes, recording a
//! [`history`] of every operation with its invoke and complete times. After the run the
//! cluster is healed, every replica must apply every commit, and the [`checker`] compares
//! the history with the final logs and with each replica; [`report`] prints and saves the
//! result. [`runner`] ties it together.
//!
//! Everything random (schedule, fault choice and targets, workload) derives from one seed,
//! printed with the report, so a run can be repeated (the timing of a real cluster still
//! varies). See [`nemesis`] for how to add fault kinds.

pub mod checker;
pub mod cluster;
pub mod damage;
pub mod history;
pub mod nemesis;
pub mod netns;
pub mod report;
pub mod runner;
pub mod workload;
