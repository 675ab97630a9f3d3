# One entry point for newcomers and CI. `make setup` is idempotent: it installs only what is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the project needs on the host, with their recommends (mmdebstrap's gpg and
# arch-test, for one), as the machines the project was developed on have them. The Python
# libraries come from Debian too, so the host runs exactly the versions the recovery OS runs.
DEB_PACKAGES := python3 python3-venv python3-pip \
	python3-pyudev python3-parted python3-psutil python3-libarchive-c python3-cryptography \
	qemu-system-x86 qemu-utils ovmf grub-pc-bin grub-efi-amd64-bin grub-common \
	mmdebstrap mtools dosfstools e2fsprogs kmod binutils parted libparted-dev pkg-config \
	libarchive13 zstd xz-utils gzip tar acl attr libcap2-bin cpio uidmap coreutils \
	python3-aiohttp chromium chromium-driver \
	debhelper dh-python dpkg-dev fakeroot lintian python3-setuptools fdisk

.PHONY: setup test test-unit test-vm test-foreign demo demo-page bench reliability clean deb

GOOSEBIT_VENV := .venv-goosebit

setup: .stamp-debs $(VENV)/.stamp $(GOOSEBIT_VENV)/.stamp

.stamp-debs: Makefile
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@touch $@

$(VENV)/.stamp: pyproject.toml .stamp-debs
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# gooseBit, the DDI server the fleet client's tests run against, with our plugin, in a venv of its own:
# it needs newer libraries from PyPI than Debian's, which the project's venv takes.
$(GOOSEBIT_VENV)/.stamp: integrations/goosebit-reflash/pyproject.toml .stamp-debs
	/usr/bin/python3 -m venv $(GOOSEBIT_VENV)
	$(GOOSEBIT_VENV)/bin/pip install -q goosebit==0.2.12 -e ./integrations/goosebit-reflash
	@touch $@

# A system tree from plain mmdebstrap, bundled and installed through the recovery: mmdebstrap takes
# minutes once per image before the test's own boots, so it has its own target, which CI does not run.
FOREIGN_TREE := tests/vm/test_foreign_tree.py
test-foreign: setup
	$(PY) -m pytest -q -p tests.reliability $(FOREIGN_TREE)

# `make test` keeps a fast subset of the fault scenarios; the full matrix is `make reliability`.
# The QEMU tests run two at a time: each guest is one emulated CPU, and the machine has two.
VM_JOBS ?= 2
test: setup
	$(PY) -m pytest -q -p tests.reliability -m "not reliability" tests/unit
	$(PY) -m pytest -q tests/bench
	$(PY) -m pytest -q -p tests.reliability -m "not reliability" -n $(VM_JOBS) --durations=15 tests/vm --ignore=$(FOREIGN_TREE)

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-vm: setup
	$(PY) -m pytest -q -p tests.reliability -m "not reliability" -n $(VM_JOBS) --durations=15 tests/vm --ignore=$(FOREIGN_TREE)

# Every power cut, failing disk and hostile input, many Hypothesis examples; writes the table.
RELIABILITY_TESTS := tests/unit/test_instruction_fuzz.py tests/unit/test_bundle_fuzz.py \
	tests/unit/test_fuzz_manifest.py tests/unit/test_hostile.py tests/unit/test_fuzz_hostile.py \
	tests/vm/test_powercut.py tests/vm/test_faults.py \
	tests/unit/test_security_extract.py tests/vm/test_install.py::test_hard_link_to_a_symlink_changes_nothing_on_cfg \
	tests/vm/test_install.py::test_tree_of_many_small_files_gets_the_inodes_it_needs \
	tests/vm/test_install.py::test_bad_bundle_is_rejected_and_the_system_untouched \
	tests/vm/test_install.py::test_update_installs_the_new_release tests/vm/test_reflashctl.py \
	tests/vm/test_install.py::test_bad_instruction_is_rejected_and_the_system_untouched \
	tests/vm/test_security_grub.py tests/unit/test_security_feed.py tests/vm/test_downgrade.py \
	tests/vm/test_rollback.py tests/vm/test_rollback_powercut.py \
	tests/vm/test_fleet.py::test_a_corrupt_artifact_ends_as_a_failure_with_the_reason \
	tests/vm/test_reflashctl.py::test_status_after_a_failed_try_and_the_install_that_followed \
	tests/vm/test_recovery_update.py tests/vm/test_key_rotation.py tests/vm/test_boot_menu.py \
	tests/vm/test_crash_states.py tests/unit/test_bootmenu.py tests/unit/test_crashcheck.py tests/vm/test_kexec.py tests/vm/test_dropin.py
reliability: setup
	RELIABILITY=full $(PY) -m pytest -q -p tests.reliability --reliability-table docs/reliability.md \
		-n $(VM_JOBS) $(RELIABILITY_TESTS)

# The appliance side as out/reflash-appliance_<version>_all.deb, built in a temporary directory and
# checked by lintian (its errors fail the build). tests/unit/test_deb.py does the same in `make test`.
deb: setup
	$(VENV)/bin/reflash deb -o out

demo: setup
	$(VENV)/bin/reflash demo

# The same cycle from the appliance's update page: open http://127.0.0.1:8080/ and press the buttons.
demo-page: setup
	$(VENV)/bin/reflash demo --page 8080

bench: setup
	$(PY) -m bench

clean:
	rm -rf out .stamp-debs $(VENV) $(GOOSEBIT_VENV)
