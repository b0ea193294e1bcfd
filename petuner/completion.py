"""``petuner completion bash``: a bash completion script for the petuner command.

Verbs complete from the parser; after ``petuner train`` the words go to Hydra's own completion (groups, their
choices and keys, ``-sc query=bash``), asked about the line as if ``train`` were the program.
"""

from __future__ import annotations

from collections.abc import Iterable

SCRIPT = """\
_petuner() {{
    local word="${{COMP_WORDS[COMP_CWORD]}}"
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{verbs} --help --version" -- "$word"))
    elif [ "${{COMP_WORDS[1]}}" = "train" ]; then
        local line="petuner ${{COMP_LINE#*train}}"
        local choices=$(COMP_POINT=${{#line}} COMP_LINE="$line" petuner train -sc query=bash 2>/dev/null)
        COMPREPLY=($(compgen -o nospace -W "$(tr ' ' '\\n' <<< "$choices" | grep -v '_schema$')" -- "$word"))
    else
        COMPREPLY=($(compgen -f -- "$word"))
    fi
}}
COMP_WORDBREAKS=${{COMP_WORDBREAKS//=}}
complete -o nospace -o default -F _petuner petuner
"""


def bash_script(verbs: Iterable[str]) -> str:
    """Source it: ``eval "$(petuner completion bash)"`` (or save it under bash-completion's folder)."""
    return SCRIPT.format(verbs=" ".join(verbs))
