#!/usr/bin/env bash
# Fetches the recorded speech of the Whisper tests and benchmark (issue 13) from Debian into a
# git-ignored cache, without installing anything: `apt-get download` + `dpkg -x`, each .deb
# checked against its sha256.
#   - pocketsphinx-testdata: LibriVox read speech, 16 kHz, with a `transcription` file (BSD-2);
#   - asterisk-core-sounds-en-wav + asterisk-core-sounds-en: 568 prompts of one voice, 8 kHz,
#     with transcripts in core-sounds-en.txt.gz (CC-BY-SA-3.0).
#
# Usage: scripts/fetch-speech.sh      prints the unpacked root on its last line
#   SPEECH_CACHE=DIR   cache folder (default <repo>/.cache/speech)
# Files: ROOT/usr/share/pocketsphinx/test/data/librivox/*.wav,
#        ROOT/usr/share/asterisk/sounds/en_US_f_Allison/**.wav,
#        ROOT/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${SPEECH_CACHE:-${repo_root}/.cache/speech}"
root="${cache}/root"
marker="${root}/.complete"
packages=(
    "pocketsphinx-testdata_0.8+5prealpha+1-15_all.deb eaeb7a01d54f20b799d1a81ef110ec544b2cb47ea006614078220737a33019f0"
    "asterisk-core-sounds-en-wav_1.6.1-1_all.deb 2be3ea287d83299d143815fa804f11179a75b7affd4a758b98b55f5afc18a35d"
    "asterisk-core-sounds-en_1.6.1-1_all.deb 973e797d28e37fa6ca3c0a9d6fa717e77cf1268ae916bf09fd3503113cdffa50"
)

if [[ -f "${marker}" ]]; then
    echo "speech already unpacked" >&2
    echo "${root}"
    exit 0
fi
mkdir -p "${cache}"
cd "${cache}"
download() {
    # name_version_all.deb → name=version
    local deb="$1" name version
    name="${deb%%_*}"
    version="${deb#*_}"
    version="${version%_all.deb}"
    apt-get download "${name}=${version}" >&2
}
for entry in "${packages[@]}"; do
    deb="${entry%% *}" sha="${entry##* }"
    if [[ ! -f "${deb}" ]] || [[ "$(sha256sum "${deb}" | cut -d' ' -f1)" != "${sha}" ]]; then
        rm -f "${deb}"
        # A fresh machine may have no package lists yet.
        download "${deb}" || { apt-get update >&2 && download "${deb}"; }
    fi
    actual="$(sha256sum "${deb}" | cut -d' ' -f1)"
    if [[ "${actual}" != "${sha}" ]]; then
        echo "error: ${cache}/${deb}: sha256 ${actual}, expected ${sha}" >&2
        exit 1
    fi
done
tmp="${cache}/root.tmp.$$"
rm -rf "${tmp}"
trap 'rm -rf "${tmp}"' EXIT
for entry in "${packages[@]}"; do
    dpkg -x "${entry%% *}" "${tmp}"
done
touch "${tmp}/.complete"
rm -rf "${root}"
mv "${tmp}" "${root}"
echo "unpacked speech into ${root}" >&2
echo "${root}"
