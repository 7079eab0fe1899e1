//! The C library as a C or C++ developer gets it: `CMakeLists.txt` builds it with cargo and
//! installs it into a scratch prefix, then, with nothing from the clone on any search path, a
//! C++ project finds it with `find_package(edgetune)` (shared and static) and the C example
//! builds with `pkg-config --cflags --libs edgetune`; each trains on the tiny test model and
//! generates (on lavapipe in CI). Needs cmake, pkg-config and readelf (scripts/setup.sh).

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::run;

fn here() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of the model and data outside the clone, as an app would have them.
fn scratch(work: &Path) -> (PathBuf, PathBuf) {
    let repo = here().join("../..");
    let model = work.join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    let tiny = repo.join("tests/reference/fixtures/tiny_llama");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny.join(f), model.join(f)).expect("copy the model");
    }
    let data = work.join("data.jsonl");
    std::fs::copy(repo.join("sdk/data/persona/train.jsonl"), &data).expect("copy the data");
    (model, data)
}

/// The training losses a program printed ("step i/n loss x"), in order.
fn losses(out: &str) -> Vec<f64> {
    out.lines().filter_map(|l| l.split(" loss ").nth(1)?.trim().parse().ok()).collect()
}

#[test]
fn the_installed_library_serves_cmake_and_pkg_config_projects() {
    let work = std::env::temp_dir().join(format!("edgetune-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let (model, data) = scratch(&work);
    let (build, prefix) = (work.join("build"), work.join("prefix"));
    // cargo's target folder: the one this test was built in (target/<profile>/deps/<test>), so
    // the release build shares what was compiled before.
    let exe = std::env::current_exe().expect("test binary");
    let target = exe.ancestors().nth(3).expect("target folder").to_path_buf();

    let mut configure = Command::new("cmake");
    configure.arg("-S").arg(here()).arg("-B").arg(&build).arg("-DCMAKE_BUILD_TYPE=Release");
    configure.arg(format!("-DEDGETUNE_CARGO_TARGET_DIR={}", target.display()));
    run(&mut configure, "cmake configure");
    run(Command::new("cmake").arg("--build").arg(&build), "cmake build");
    run(Command::new("cmake").arg("--install").arg(&build).arg("--prefix").arg(&prefix), "cmake install");

    let lib = prefix.join("lib");
    let version = env!("CARGO_PKG_VERSION");
    let abi = format!("{}.{}", env!("CARGO_PKG_VERSION_MAJOR"), env!("CARGO_PKG_VERSION_MINOR"));
    let real = lib.join(format!("libedgetune.so.{version}"));
    let soname = format!("libedgetune.so.{abi}");
    assert!(real.is_file() && lib.join("libedgetune.a").is_file() && prefix.join("include/edgetune.h").is_file());
    for (link, to) in [(soname.clone(), format!("libedgetune.so.{version}")), ("libedgetune.so".into(), soname.clone())]
    {
        assert_eq!(std::fs::read_link(lib.join(&link)).expect("a link"), PathBuf::from(&to), "{link}");
    }
    let dynamic = run(Command::new("readelf").arg("-d").arg(&real), "readelf");
    assert!(dynamic.contains(&format!("Library soname: [{soname}]")), "{dynamic}");
    for f in ["cmake/edgetune/edgetuneConfig.cmake", "cmake/edgetune/edgetuneConfigVersion.cmake"] {
        assert!(lib.join(f).is_file(), "{f}");
    }

    // A C++ project, shared and static, finds the package by its prefix alone.
    let project = here().join("examples/cmake");
    for (name, static_) in [("shared", "OFF"), ("static", "ON")] {
        let ex = work.join(format!("example-{name}"));
        let mut configure = Command::new("cmake");
        configure.arg("-S").arg(&project).arg("-B").arg(&ex).arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()));
        run(configure.arg(format!("-DEDGETUNE_STATIC={static_}")), &format!("cmake configure ({name} example)"));
        run(Command::new("cmake").arg("--build").arg(&ex), &format!("cmake build ({name} example)"));
        let program = ex.join("personalize");
        let needed = run(Command::new("readelf").arg("-d").arg(&program), "readelf example");
        assert_eq!(needed.contains(&format!("Shared library: [{soname}]")), static_ == "OFF", "{needed}");
        let mut cmd = Command::new(&program);
        let out = run(cmd.arg(&model).arg(&data).arg("Where do you live?").arg("6"), &format!("{name} example"));
        assert!(out.starts_with(&format!("edgetune {version} (header {version})")), "{out}");
        let l = losses(&out);
        assert!(l.len() == 6 && l[5] < l[0], "six steps whose loss falls: {l:?}");
        assert!(out.contains("\nanswer: "), "{out}");
    }

    // The C example through pkg-config, with the prefix's pkgconfig folder as the only hint.
    let pc = Command::new("pkg-config")
        .args(["--cflags", "--libs", "edgetune"])
        .env("PKG_CONFIG_PATH", lib.join("pkgconfig"))
        .output()
        .expect("pkg-config");
    assert!(pc.status.success(), "pkg-config: {}", String::from_utf8_lossy(&pc.stderr));
    let flags = String::from_utf8_lossy(&pc.stdout).to_string();
    assert!(flags.contains("-ledgetune"), "{flags}");
    let program = work.join("personalize-c");
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror"]).arg(here().join("examples/personalize.c"));
    cc.args(flags.split_whitespace()).arg("-o").arg(&program);
    run(&mut cc, "cc with pkg-config's flags");
    let out = run(
        Command::new(&program).arg(&model).arg(&data).arg(work.join("adapter")).env("LD_LIBRARY_PATH", &lib),
        "the C example",
    );
    assert!(out.contains("PEFT adapter written to") && work.join("adapter/adapter_config.json").is_file(), "{out}");
    let _ = std::fs::remove_dir_all(&work);
}
