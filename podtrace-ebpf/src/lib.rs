//! Empty: this crate is built as a BPF binary (src/main.rs) by podtrace/build.rs. The library
//! target exists so podtrace can list it as a build dependency (rebuilds on change).
#![no_std]
