//! Gives the shared library a versioned soname when the install step asks for one
//! (`EDGETUNE_CAPI_SONAME=1`, set by CMakeLists.txt), as C libraries have: while the major
//! version is 0 every minor version may change the ABI, so the soname carries both,
//! `libedgetune.so.0.1` (cargo-c's convention). Builds for the tests leave it out, so the
//! library in the target folder loads as plain `libedgetune.so`.

fn main() {
    println!("cargo:rerun-if-env-changed=EDGETUNE_CAPI_SONAME");
    if std::env::var("EDGETUNE_CAPI_SONAME").is_ok_and(|v| v == "1") {
        let major = env!("CARGO_PKG_VERSION_MAJOR");
        let minor = env!("CARGO_PKG_VERSION_MINOR");
        let abi = if major == "0" { format!("{major}.{minor}") } else { major.to_string() };
        match std::env::var("CARGO_CFG_TARGET_OS").as_deref() {
            Ok("linux" | "android" | "freebsd") => {
                println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libedgetune.so.{abi}");
            }
            Ok("macos" | "ios") => {
                println!("cargo:rustc-cdylib-link-arg=-Wl,-install_name,@rpath/libedgetune.{abi}.dylib");
            }
            _ => {}
        }
    }
}
