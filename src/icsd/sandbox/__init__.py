"""The sandbox world: a closed world where the whole ICSD method runs and is measured on a CPU.

Hidden scenes (:mod:`.world`), their partial captions, the world's lexicon and parser
(:mod:`.lexicon`), drawing (:mod:`.draw`), the text-to-image and camera backends
(:mod:`.renderer`), the symbolic selector (:mod:`.selector`), world files (:mod:`.make`) and a
captioner family that learns the world in minutes (:mod:`.captioner`). See docs/sandbox.md.
"""
